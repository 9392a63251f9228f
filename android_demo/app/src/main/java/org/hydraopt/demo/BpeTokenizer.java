package org.hydraopt.demo;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.CharBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CharsetDecoder;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.Charset;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Byte-level BPE on a Hugging Face {@code tokenizer.json} (GPT-2 style, as SmolLM2 uses): added tokens
 * are split off first, the rest is cut by the GPT-2 pattern, each piece's UTF-8 bytes are mapped to
 * printable characters and merged by rank. No normalizer, no prefix space, no post-processor (the
 * SmolLM2 tokenizer has none); a {@code tokenizer.json} that asks for anything else is refused.
 */
public final class BpeTokenizer {
    // Unicode White_Space, what \s means in Rust's regex (tokenizers); spelled out because \s differs
    // between the desktop JVM (ASCII unless UNICODE_CHARACTER_CLASS, which Android lacks) and Android (ICU)
    private static final String WS = "\\t\\n\\u000B\\f\\r \\u0085\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000";
    // tokenizers' ByteLevel pre-tokenizer pattern (GPT-2's)
    private static final Pattern PIECES = Pattern.compile(
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" + WS + "\\p{L}\\p{N}]+|[" + WS + "]+(?![^" + WS + "])|[" + WS + "]+");

    private final Map<String, Integer> vocab;
    private final String[] idToToken;
    private final Map<String, Integer> mergeRank = new HashMap<String, Integer>();
    private final Map<String, Integer> added = new LinkedHashMap<String, Integer>();
    private final List<String> addedLongestFirst;
    private final boolean[] special;
    private final char[] byteToChar = new char[256];
    private final Map<Character, Integer> charToByte = new HashMap<Character, Integer>();
    private final Map<String, int[]> cache = new HashMap<String, int[]>();

    public BpeTokenizer(File tokenizerJson) throws IOException {
        this(ExportManifest.readUtf8(tokenizerJson));
    }

    @SuppressWarnings("unchecked")
    public BpeTokenizer(String json) {
        Map<String, Object> t = (Map<String, Object>) Json.parse(json);
        Map<String, Object> model = (Map<String, Object>) t.get("model");
        if (model == null || !"BPE".equals(model.get("type"))) throw new IllegalArgumentException("tokenizer.json: not a BPE model");
        if (t.get("normalizer") != null) throw new IllegalArgumentException("tokenizer.json: normalizers are not supported");
        Map<String, Object> pre = (Map<String, Object>) t.get("pre_tokenizer");
        if (pre == null || !"ByteLevel".equals(pre.get("type")) || Boolean.TRUE.equals(pre.get("add_prefix_space"))
            || Boolean.FALSE.equals(pre.get("use_regex"))) {
            throw new IllegalArgumentException("tokenizer.json: only a ByteLevel pre-tokenizer without prefix space is supported");
        }
        if (Boolean.TRUE.equals(model.get("byte_fallback")) || Boolean.TRUE.equals(model.get("ignore_merges"))
            || (model.get("dropout") != null)) {
            throw new IllegalArgumentException("tokenizer.json: byte_fallback, ignore_merges and dropout are not supported");
        }
        Map<String, Object> v = (Map<String, Object>) model.get("vocab");
        vocab = new HashMap<String, Integer>(v.size() * 2);
        int max = 0;
        for (Map.Entry<String, Object> e : v.entrySet()) {
            int id = ((Long) e.getValue()).intValue();
            vocab.put(e.getKey(), id);
            max = Math.max(max, id);
        }
        List<Object> addedTokens = (List<Object>) t.get("added_tokens");
        for (Object o : addedTokens) {
            Map<String, Object> a = (Map<String, Object>) o;
            max = Math.max(max, ((Long) a.get("id")).intValue());
        }
        idToToken = new String[max + 1];
        special = new boolean[max + 1];
        for (Map.Entry<String, Integer> e : vocab.entrySet()) idToToken[e.getValue()] = e.getKey();
        for (Object o : addedTokens) {
            Map<String, Object> a = (Map<String, Object>) o;
            int id = ((Long) a.get("id")).intValue();
            String content = (String) a.get("content");
            added.put(content, id);
            idToToken[id] = content;
            special[id] = Boolean.TRUE.equals(a.get("special"));
        }
        addedLongestFirst = new ArrayList<String>(added.keySet());
        Collections.sort(addedLongestFirst, new Comparator<String>() {
            public int compare(String a, String b) { return b.length() - a.length(); }
        });
        List<Object> merges = (List<Object>) model.get("merges");
        for (int i = 0; i < merges.size(); i++) {
            Object m = merges.get(i);
            String key;
            if (m instanceof List) {
                List<Object> pair = (List<Object>) m;
                key = pair.get(0) + " " + pair.get(1);
            } else {
                key = (String) m;  // older "a b" form
            }
            if (!mergeRank.containsKey(key)) mergeRank.put(key, i);
        }
        // GPT-2's byte <-> printable character table
        int n = 0;
        for (int b = 0; b < 256; b++) {
            boolean printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            byteToChar[b] = printable ? (char) b : (char) (256 + n++);
            charToByte.put(byteToChar[b], b);
        }
    }

    public int vocabSize() { return idToToken.length; }

    public Integer tokenId(String token) {
        Integer id = added.get(token);
        return id != null ? id : vocab.get(token);
    }

    public boolean isSpecial(int id) { return id >= 0 && id < special.length && special[id]; }

    /** Token ids of {@code text}; added tokens (such as {@code <|im_start|>}) in the text become their ids. */
    public int[] encode(String text) {
        List<Integer> out = new ArrayList<Integer>();
        int start = 0, i = 0;
        while (i < text.length()) {
            String hit = null;
            for (String a : addedLongestFirst) {
                if (text.startsWith(a, i)) { hit = a; break; }
            }
            if (hit == null) { i++; continue; }
            encodeOrdinary(text.substring(start, i), out);
            out.add(added.get(hit));
            i += hit.length();
            start = i;
        }
        encodeOrdinary(text.substring(start), out);
        int[] ids = new int[out.size()];
        for (int k = 0; k < ids.length; k++) ids[k] = out.get(k);
        return ids;
    }

    private void encodeOrdinary(String text, List<Integer> out) {
        if (text.isEmpty()) return;
        Matcher m = PIECES.matcher(text);
        while (m.find()) {
            for (int id : bpe(m.group())) out.add(id);
        }
    }

    private int[] bpe(String piece) {
        int[] hit = cache.get(piece);
        if (hit != null) return hit;
        byte[] bytes = piece.getBytes(Charset.forName("UTF-8"));
        List<String> symbols = new ArrayList<String>(bytes.length);
        for (byte b : bytes) symbols.add(String.valueOf(byteToChar[b & 0xff]));
        while (symbols.size() > 1) {
            int best = -1, bestRank = Integer.MAX_VALUE;
            for (int k = 0; k + 1 < symbols.size(); k++) {
                Integer r = mergeRank.get(symbols.get(k) + " " + symbols.get(k + 1));
                if (r != null && r < bestRank) { bestRank = r; best = k; }
            }
            if (best < 0) break;
            String a = symbols.get(best), b = symbols.get(best + 1);
            List<String> next = new ArrayList<String>(symbols.size());
            for (int k = 0; k < symbols.size(); k++) {  // merge every occurrence of this pair, left to right
                if (k + 1 < symbols.size() && symbols.get(k).equals(a) && symbols.get(k + 1).equals(b)) {
                    next.add(a + b);
                    k++;
                } else {
                    next.add(symbols.get(k));
                }
            }
            symbols = next;
        }
        int[] ids = new int[symbols.size()];
        for (int k = 0; k < ids.length; k++) {
            Integer id = vocab.get(symbols.get(k));
            if (id == null) throw new IllegalStateException("tokenizer.json: no id for symbol " + symbols.get(k));
            ids[k] = id;
        }
        if (cache.size() < 100000) cache.put(piece, ids);
        return ids;
    }

    /** The bytes of token {@code id} (special tokens: their text, or nothing when {@code skipSpecial}). */
    public byte[] tokenBytes(int id, boolean skipSpecial) {
        if (id < 0 || id >= idToToken.length || idToToken[id] == null) throw new IllegalArgumentException("token id " + id + " out of range");
        String tok = idToToken[id];
        if (added.containsKey(tok)) {
            return skipSpecial && special[id] ? new byte[0] : tok.getBytes(Charset.forName("UTF-8"));
        }
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        for (int k = 0; k < tok.length(); k++) {
            Integer x = charToByte.get(tok.charAt(k));
            if (x == null) throw new IllegalStateException("token " + id + " holds a character outside the byte table");
            b.write(x);
        }
        return b.toByteArray();
    }

    public String decode(int[] ids, boolean skipSpecial) {
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        for (int id : ids) {
            byte[] x = tokenBytes(id, skipSpecial);
            b.write(x, 0, x.length);
        }
        return new String(b.toByteArray(), Charset.forName("UTF-8"));
    }

    /** Streaming decoder: feed token ids, get the text that is complete UTF-8 so far. */
    public final class Stream {
        private final ByteArrayOutputStream pending = new ByteArrayOutputStream();
        private final boolean skipSpecial;

        public Stream(boolean skipSpecial) { this.skipSpecial = skipSpecial; }

        public String push(int id) {
            byte[] x = tokenBytes(id, skipSpecial);
            pending.write(x, 0, x.length);
            byte[] all = pending.toByteArray();
            int complete = all.length;
            // hold back an incomplete UTF-8 sequence at the end
            for (int back = 1; back <= Math.min(3, all.length); back++) {
                int c = all[all.length - back] & 0xff;
                if ((c & 0xC0) == 0x80) continue;  // continuation byte
                int need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
                if (need > back) complete = all.length - back;
                break;
            }
            CharsetDecoder dec = Charset.forName("UTF-8").newDecoder()
                .onMalformedInput(CodingErrorAction.REPLACE).onUnmappableCharacter(CodingErrorAction.REPLACE);
            String text;
            try {
                CharBuffer chars = dec.decode(ByteBuffer.wrap(all, 0, complete));
                text = chars.toString();
            } catch (CharacterCodingException e) {
                throw new IllegalStateException(e);
            }
            pending.reset();
            pending.write(all, complete, all.length - complete);
            return text;
        }
    }
}
