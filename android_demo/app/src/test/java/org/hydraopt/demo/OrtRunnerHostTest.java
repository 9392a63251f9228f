package org.hydraopt.demo;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.BeforeClass;
import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/**
 * The app's runtime code ({@link OrtRunner}: sessions, task load and switch, KV-cache decode loop, and
 * {@link DeviceRunner}) on real exports of a tiny model, against the host's Python runtime
 * ({@code exporters/runtime.py} on ONNX Runtime 1.32), whose outputs tests/test_android.py writes to
 * the reference file. Runs on ONNX Runtime's Java API built for the host (build.sh junit-runtime).
 */
public class OrtRunnerHostTest {
    @Rule public TemporaryFolder tmp = new TemporaryFolder();
    private static Map<String, Object> ref;

    @BeforeClass
    @SuppressWarnings("unchecked")
    public static void load() throws Exception {
        ref = (Map<String, Object>) Json.parse(ExportManifest.readUtf8(TestData.required("hydraopt.runtime.reference")));
    }

    private static int[] ints(Object o) {
        List<?> xs = (List<?>) o;
        int[] a = new int[xs.size()];
        for (int i = 0; i < a.length; i++) a[i] = ((Long) xs.get(i)).intValue();
        return a;
    }

    private static double maxDiff(float[] got, Object want) {
        List<?> w = (List<?>) want;
        assertEquals(w.size(), got.length);
        double m = 0;
        for (int i = 0; i < got.length; i++) m = Math.max(m, Math.abs(got[i] - ((Number) w.get(i)).doubleValue()));
        return m;
    }

    @SuppressWarnings("unchecked")
    private void matchesPython(String quant, double tol) throws Exception {
        Map<String, Object> r = (Map<String, Object>) ref.get(quant);
        ExportManifest m = ExportManifest.read(new File((String) r.get("export")));
        int[] prompt = ints(ref.get("prompt"));
        OrtRunner runner = new OrtRunner(m, 1);
        try {
            // no task: the base model (zero slots)
            Map<String, Object> base = (Map<String, Object>) r.get("base");
            OrtRunner.Generation g0 = runner.greedy(prompt, 6, null);
            assertArrayEquals(quant + " base tokens", ints(base.get("tokens")), toArray(g0.tokens));
            float[] previousAlpha = null;
            for (String task : new String[] {"alpha", "beta", "alpha", "gamma"}) {
                double sw = runner.setTask(task);
                assertTrue(sw >= 0 && runner.loadMs(task) > 0);
                Map<String, Object> want = (Map<String, Object>) ((Map<String, Object>) r.get("tasks")).get(task);
                float[] prefill = runner.prefill(prompt);
                double err = maxDiff(prefill, want.get("prefill_last"));
                assertTrue(quant + " " + task + ": prefill logits differ from Python's by " + err, err < tol);
                float[] step = runner.decode(OrtRunner.argmax(prefill));
                err = maxDiff(step, want.get("decode_first"));
                assertTrue(quant + " " + task + ": decode logits differ by " + err, err < tol);
                final List<Integer> streamed = new ArrayList<Integer>();
                OrtRunner.Generation g = runner.greedy(prompt, 6, new OrtRunner.TokenListener() {
                    public void onToken(int token) { streamed.add(token); }
                });
                assertArrayEquals(quant + " " + task + " greedy tokens", ints(want.get("tokens")), toArray(g.tokens));
                assertEquals(g.tokens, streamed);
                assertTrue(g.prefillMs > 0 && g.msPerToken() > 0);
                if (task.equals("alpha")) {
                    if (previousAlpha != null) assertArrayEquals("alpha after switching back: bit-identical", previousAlpha, prefill, 0f);
                    previousAlpha = prefill;
                }
            }
        } finally {
            runner.close();
        }
    }

    private static int[] toArray(List<Integer> xs) {
        int[] a = new int[xs.size()];
        for (int i = 0; i < a.length; i++) a[i] = xs.get(i);
        return a;
    }

    @Test
    public void fp32MatchesThePythonRuntimeForEveryTaskAndSwitch() throws Exception {
        matchesPython("fp32", 1e-4);
    }

    @Test
    public void int4MatchesThePythonRuntimeForEveryTaskAndSwitch() throws Exception {
        matchesPython("int4", 2e-3);
    }

    @Test
    @SuppressWarnings("unchecked")
    public void corruptedTaskFileIsRefusedBeforeOnnxRuntimeSeesIt() throws Exception {
        File export = TestData.copy(new File((String) ((Map<String, Object>) ref.get("fp32")).get("export")), new File(tmp.getRoot(), "e"));
        ExportManifest m = ExportManifest.read(export);
        OrtRunner runner = new OrtRunner(m, 1);
        try {
            runner.setTask("gamma");
            File beta = new File(export, "bank/tasks/beta.safetensors");
            byte[] data = Files.readAllBytes(beta.toPath());
            data[data.length / 2] ^= 1;
            TestData.write(beta, data);
            try {
                runner.setTask("beta");
                fail("corrupted task file loaded");
            } catch (ExportException e) {
                assertTrue(e.getMessage(), e.getMessage().contains("SHA-256"));
            }
            assertEquals("gamma", runner.activeTask());
            assertEquals(null, runner.loadMs("beta"));
        } finally {
            runner.close();
        }
    }

    @Test
    @SuppressWarnings("unchecked")
    public void corruptedSharedFileIsRefusedWhenTheRunnerOpens() throws Exception {
        File export = TestData.copy(new File((String) ((Map<String, Object>) ref.get("fp32")).get("export")), new File(tmp.getRoot(), "e"));
        File shared = new File(export, "bank/shared.safetensors");
        byte[] data = Files.readAllBytes(shared.toPath());
        data[data.length - 1] ^= 1;
        TestData.write(shared, data);
        try {
            new OrtRunner(ExportManifest.read(export), 1).close();
            fail("a corrupted shared file was decoded");
        } catch (ExportException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("shared.safetensors: SHA-256") && e.getMessage().contains("shared file"));
        }
    }

    /**
     * Why the slots reach the program through an in-memory adapter ({@link LoraAdapterBytes}): the Java
     * API lists only the inputs without defaults and refuses any other name, so a slot cannot be fed.
     */
    @Test
    @SuppressWarnings("unchecked")
    public void javaApiRefusesSlotsAsPlainInputs() throws Exception {
        ExportManifest m = ExportManifest.read(new File((String) ((Map<String, Object>) ref.get("fp32")).get("export")));
        String slot = m.plan.inputs.keySet().iterator().next();
        int[] shape = m.plan.inputs.get(slot);
        ai.onnxruntime.OrtEnvironment env = ai.onnxruntime.OrtEnvironment.getEnvironment();
        ai.onnxruntime.OrtSession session = env.createSession(m.resolve(m.program()).getPath(), new ai.onnxruntime.OrtSession.SessionOptions());
        ai.onnxruntime.OnnxTensor t = ai.onnxruntime.OnnxTensor.createTensor(env, java.nio.FloatBuffer.allocate(shape[0] * shape[1]),
            new long[] {shape[0], shape[1]});
        try {
            assertTrue(session.getInputNames().contains("input_ids") && !session.getInputNames().contains(slot));
            Map<String, ai.onnxruntime.OnnxTensor> feeds = new LinkedHashMap<String, ai.onnxruntime.OnnxTensor>();
            feeds.put(slot, t);
            session.run(feeds);
            fail("ONNX Runtime's Java API took a slot as an input");
        } catch (ai.onnxruntime.OrtException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("Unknown input name " + slot));
        } finally {
            t.close();
            session.close();
        }
    }

    @Test
    @SuppressWarnings("unchecked")
    public void deviceRunnerProtocolGivesTheSameTokens() throws Exception {
        Map<String, Object> r = (Map<String, Object>) ref.get("fp32");
        Map<String, Object> req = new LinkedHashMap<String, Object>();
        req.put("protocol", DeviceRunner.PROTOCOL);
        req.put("export", r.get("export"));
        req.put("tasks", Arrays.asList((Object) "beta", "alpha"));
        Map<String, Object> prompts = new LinkedHashMap<String, Object>();
        prompts.put("beta", Arrays.asList(ref.get("prompt")));
        prompts.put("alpha", Arrays.asList(ref.get("prompt")));
        req.put("prompts", prompts);
        req.put("max_new_tokens", 6L);
        File in = new File(tmp.getRoot(), "request.json"), out = new File(tmp.getRoot(), "response.json");
        TestData.write(in, Json.write(req).getBytes("UTF-8"));
        DeviceRunner.runFiles(in, out, "host-jvm");
        Map<String, Object> res = (Map<String, Object>) Json.parse(ExportManifest.readUtf8(out));
        assertEquals(null, res.get("error"));
        assertEquals(DeviceRunner.PROTOCOL, res.get("protocol"));
        ExportManifest m = ExportManifest.read(new File((String) r.get("export")));
        assertEquals(m.residentBytes(), ((Long) res.get("resident_bytes")).longValue());
        List<Object> tasks = (List<Object>) res.get("tasks");
        assertEquals(2, tasks.size());
        for (Object o : tasks) {
            Map<String, Object> t = (Map<String, Object>) o;
            String name = (String) t.get("task");
            assertEquals(m.taskBytes(name), ((Long) t.get("task_bytes")).longValue());
            assertNotNull(t.get("load_ms"));
            Map<String, Object> output = (Map<String, Object>) ((List<Object>) t.get("outputs")).get(0);
            Map<String, Object> want = (Map<String, Object>) ((Map<String, Object>) r.get("tasks")).get(name);
            assertEquals(want.get("tokens"), output.get("tokens"));
        }
        // a refused export is reported in the response, not a crash
        req.put("export", new File(tmp.getRoot(), "nowhere").getPath());
        TestData.write(in, Json.write(req).getBytes("UTF-8"));
        Map<String, Object> bad = DeviceRunner.runFiles(in, out, "host-jvm");
        assertTrue(String.valueOf(bad.get("error")).contains("not an export folder"));
    }
}
