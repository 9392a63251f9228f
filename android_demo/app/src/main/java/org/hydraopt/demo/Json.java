package org.hydraopt.demo;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * A small strict JSON parser (RFC 8259): objects become {@link LinkedHashMap}, arrays {@link ArrayList},
 * numbers {@link Long} when integral and {@link Double} otherwise. Used for the export's manifest and
 * tokenizer.json on Android and on the host JVM alike (android.jar's org.json is not on the host).
 */
public final class Json {
    private final String s;
    private int pos;

    private Json(String s) {
        this.s = s;
    }

    public static Object parse(String text) {
        Json p = new Json(text);
        p.ws();
        Object v = p.value();
        p.ws();
        if (p.pos != p.s.length()) throw p.error("trailing characters");
        return v;
    }

    private IllegalArgumentException error(String what) {
        return new IllegalArgumentException("JSON: " + what + " at offset " + pos);
    }

    private void ws() {
        while (pos < s.length()) {
            char c = s.charAt(pos);
            if (c == ' ' || c == '\t' || c == '\n' || c == '\r') pos++;
            else break;
        }
    }

    private Object value() {
        if (pos >= s.length()) throw error("unexpected end");
        char c = s.charAt(pos);
        switch (c) {
            case '{': return object();
            case '[': return array();
            case '"': return string();
            case 't': return literal("true", Boolean.TRUE);
            case 'f': return literal("false", Boolean.FALSE);
            case 'n': return literal("null", null);
            default:
                if (c == '-' || (c >= '0' && c <= '9')) return number();
                throw error("unexpected character '" + c + "'");
        }
    }

    private Object literal(String word, Object v) {
        if (!s.startsWith(word, pos)) throw error("expected " + word);
        pos += word.length();
        return v;
    }

    private Map<String, Object> object() {
        Map<String, Object> out = new LinkedHashMap<String, Object>();
        if (opensEmpty('}')) return out;
        do {
            ws();
            if (peek() != '"') throw error("expected a key");
            String key = string();
            ws();
            if (peek() != ':') throw error("expected ':'");
            pos++;
            ws();
            if (out.containsKey(key)) throw error("duplicate key \"" + key + "\"");
            out.put(key, value());
        } while (another('}'));
        return out;
    }

    private List<Object> array() {
        List<Object> out = new ArrayList<Object>();
        if (opensEmpty(']')) return out;
        do {
            ws();
            out.add(value());
        } while (another(']'));
        return out;
    }

    /** Steps past a container's opening bracket; true, and past {@code close} too, when the container is empty. */
    private boolean opensEmpty(char close) {
        pos++;
        ws();
        if (peek() != close) return false;
        pos++;
        return true;
    }

    /** After a container's element: true past a ',' (another element follows), false past {@code close}. */
    private boolean another(char close) {
        ws();
        char c = peek();
        pos++;
        if (c == close) return false;
        if (c != ',') throw error("expected ',' or '" + close + "'");
        return true;
    }

    private char peek() {
        if (pos >= s.length()) throw error("unexpected end");
        return s.charAt(pos);
    }

    private String string() {
        pos++;
        StringBuilder b = new StringBuilder();
        while (true) {
            char c = peek();
            pos++;
            if (c == '"') return b.toString();
            if (c < 0x20) throw error("control character in a string");
            if (c != '\\') { b.append(c); continue; }
            char e = peek();
            pos++;
            switch (e) {
                case '"': b.append('"'); break;
                case '\\': b.append('\\'); break;
                case '/': b.append('/'); break;
                case 'b': b.append('\b'); break;
                case 'f': b.append('\f'); break;
                case 'n': b.append('\n'); break;
                case 'r': b.append('\r'); break;
                case 't': b.append('\t'); break;
                case 'u':
                    if (pos + 4 > s.length()) throw error("short \\u escape");
                    try {
                        b.append((char) Integer.parseInt(s.substring(pos, pos + 4), 16));
                    } catch (NumberFormatException ex) {
                        throw error("bad \\u escape");
                    }
                    pos += 4;
                    break;
                default: throw error("bad escape \\" + e);
            }
        }
    }

    private Object number() {
        int start = pos;
        if (peek() == '-') pos++;
        boolean integral = true;
        while (pos < s.length()) {
            char c = s.charAt(pos);
            if (c >= '0' && c <= '9') pos++;
            else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') { integral = false; pos++; }
            else break;
        }
        String t = s.substring(start, pos);
        try {
            if (integral) return Long.valueOf(t);
            return Double.valueOf(t);
        } catch (NumberFormatException ex) {
            throw error("bad number " + t);
        }
    }

    /** Writes a JSON value (maps, lists, strings, numbers, booleans, null). */
    public static String write(Object v) {
        StringBuilder b = new StringBuilder();
        write(v, b);
        return b.toString();
    }

    private static void write(Object v, StringBuilder b) {
        if (v == null) { b.append("null"); return; }
        if (v instanceof String) { quote((String) v, b); return; }
        if (v instanceof Number || v instanceof Boolean) { b.append(v); return; }
        if (v instanceof Map) {
            b.append('{');
            boolean first = true;
            for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet()) {
                if (!first) b.append(", ");
                first = false;
                quote(String.valueOf(e.getKey()), b);
                b.append(": ");
                write(e.getValue(), b);
            }
            b.append('}');
            return;
        }
        if (v instanceof List) {
            b.append('[');
            boolean first = true;
            for (Object o : (List<?>) v) {
                if (!first) b.append(", ");
                first = false;
                write(o, b);
            }
            b.append(']');
            return;
        }
        if (v instanceof int[]) {
            b.append('[');
            int[] a = (int[]) v;
            for (int i = 0; i < a.length; i++) b.append(i == 0 ? "" : ", ").append(a[i]);
            b.append(']');
            return;
        }
        throw new IllegalArgumentException("cannot write " + v.getClass());
    }

    private static void quote(String s, StringBuilder b) {
        b.append('"');
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '"' || c == '\\') b.append('\\').append(c);
            else if (c == '\n') b.append("\\n");
            else if (c == '\r') b.append("\\r");
            else if (c == '\t') b.append("\\t");
            else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
            else b.append(c);
        }
        b.append('"');
    }
}
