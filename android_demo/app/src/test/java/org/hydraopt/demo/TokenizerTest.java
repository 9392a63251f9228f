package org.hydraopt.demo;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.util.List;
import java.util.Map;
import org.junit.BeforeClass;
import org.junit.Test;

/**
 * The Java tokenizer against the Python (Hugging Face) tokenizer on the same tokenizer.json: the cases
 * file holds every suite prompt in the chat template, every target, and edge cases, each with the ids
 * Python gave (written by tests/test_android.py, not committed).
 */
public class TokenizerTest {
    private static BpeTokenizer tok;
    private static Map<String, Object> data;

    @BeforeClass
    @SuppressWarnings("unchecked")
    public static void load() throws Exception {
        data = (Map<String, Object>) Json.parse(ExportManifest.readUtf8(TestData.required("hydraopt.tokenizer.cases")));
        tok = new BpeTokenizer(new File((String) data.get("tokenizer_json")));
    }

    private static int[] ints(List<Object> xs) {
        int[] a = new int[xs.size()];
        for (int i = 0; i < a.length; i++) a[i] = ((Long) xs.get(i)).intValue();
        return a;
    }

    @Test
    @SuppressWarnings("unchecked")
    public void idsEqualPythonOnEveryCase() {
        List<Object> cases = (List<Object>) data.get("cases");
        long expected = (Long) data.get("n_cases");
        assertEquals("cases in the file", expected, cases.size());
        assertTrue("too few cases to mean anything: " + cases.size(), cases.size() >= 100);
        int mismatches = 0;
        String first = null;
        for (Object o : cases) {
            Map<String, Object> c = (Map<String, Object>) o;
            String text = (String) c.get("text");
            int[] want = ints((List<Object>) c.get("ids"));
            int[] got = tok.encode(text);
            if (!java.util.Arrays.equals(want, got)) {
                mismatches++;
                if (first == null) first = Json.write(text) + "\n python " + java.util.Arrays.toString(want) + "\n java   " + java.util.Arrays.toString(got);
            }
        }
        assertEquals("cases whose ids differ from Python's; first: " + first, 0, mismatches);
    }

    @Test
    @SuppressWarnings("unchecked")
    public void chatTemplateRendersLikePython() throws Exception {
        ChatTemplate.check(ExportManifest.readUtf8(new File((String) data.get("chat_template"))));
        List<Object> chats = (List<Object>) data.get("chat");
        assertTrue(chats.size() >= 12);
        for (Object o : chats) {
            Map<String, Object> c = (Map<String, Object>) o;
            assertEquals((String) c.get("text"), ChatTemplate.render((String) c.get("system"), (String) c.get("user")));
        }
    }

    @Test(expected = ExportException.class)
    public void anotherChatTemplateIsRefused() throws Exception {
        ChatTemplate.check("{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}");
    }

    @Test
    @SuppressWarnings("unchecked")
    public void decodeGivesTheTextBackAndStreamingAgrees() {
        for (Object o : (List<Object>) data.get("cases")) {
            Map<String, Object> c = (Map<String, Object>) o;
            String text = (String) c.get("text");
            int[] ids = ints((List<Object>) c.get("ids"));
            assertEquals(text, tok.decode(ids, false));
            BpeTokenizer.Stream s = tok.new Stream(false);
            StringBuilder b = new StringBuilder();
            for (int id : ids) b.append(s.push(id));
            assertEquals("streamed", text, b.toString());
        }
    }

    @Test
    public void specialTokensAreSingleIds() {
        assertArrayEquals(new int[] {1}, tok.encode("<|im_start|>"));
        assertArrayEquals(new int[] {2}, tok.encode("<|im_end|>"));
        assertTrue(tok.isSpecial(2));
        assertEquals("", tok.decode(new int[] {1, 2}, true));
    }
}
