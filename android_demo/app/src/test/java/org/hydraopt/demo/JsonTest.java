package org.hydraopt.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.fail;

import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.Map;
import org.junit.Test;

public class JsonTest {
    @Test
    public void roundTrip() {
        Map<String, Object> m = new LinkedHashMap<String, Object>();
        m.put("s", "a\"b\\c\n\u00e9\u4e2d");
        m.put("n", 12L);
        m.put("x", 1.5);
        m.put("l", Arrays.asList((Object) 1L, null, true));
        assertEquals(m, Json.parse(Json.write(m)));
        assertEquals("\u00e9", Json.parse("\"\\u00e9\""));
    }

    @Test
    public void rejectsMalformedInput() {
        for (String bad : new String[] {"{", "{\"a\":1,}", "[1 2]", "{\"a\":1,\"a\":2}", "\"\\x\"", "01x", "{} x"}) {
            try {
                Json.parse(bad);
                fail("accepted " + bad);
            } catch (IllegalArgumentException expected) {
                // refused
            }
        }
    }
}
