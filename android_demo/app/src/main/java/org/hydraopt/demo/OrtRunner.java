package org.hydraopt.demo;

import ai.onnxruntime.OnnxTensor;
import ai.onnxruntime.OrtEnvironment;
import ai.onnxruntime.OrtException;
import ai.onnxruntime.OrtLoggingLevel;
import ai.onnxruntime.OrtLoraAdapter;
import ai.onnxruntime.OrtSession;
import java.io.File;
import java.nio.FloatBuffer;
import java.nio.LongBuffer;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * An ONNX export on ONNX Runtime's Java API, as {@code exporters/onnx_backend.py}'s {@code OrtSession}
 * runs it on the host (through {@code exporters/targets/device_runner.py}): one session on the program,
 * whose inputs include every LoRA slot of its signature (default zero: no task is the base model).
 * The bank's shared file is checked and decoded once when the runner opens ({@link BankSlots});
 * {@link #loadTask} checks the task's own file against the manifest and decodes it, which gives the
 * task's fp32 value for every slot. The host feeds those as inputs; ORT's Java API cannot (its
 * {@code OrtSession.run} accepts only inputs without defaults, "Unknown input name" otherwise), so they
 * become an in-memory adapter ({@link LoraAdapterBytes}, ONNX Runtime's own multi-LoRA route) that is
 * active on every program run of that task. {@link #setTask} only picks which run options (which
 * adapter) the program runs with: the switch reloads and decodes nothing. The KV cache is explicit:
 * {@code past.i} in, {@code present.i} out.
 * Plain Java (no android.*), so the same code runs wherever ONNX Runtime's Java API loads.
 */
public final class OrtRunner implements AutoCloseable {
    /** Called with each generated token as soon as it is known. */
    public interface TokenListener {
        void onToken(int token);
    }

    /** What one greedy generation cost. */
    public static final class Generation {
        public final List<Integer> tokens = new ArrayList<Integer>();
        public double prefillMs;
        public final List<Double> decodeMs = new ArrayList<Double>();

        public double msPerToken() {
            if (decodeMs.isEmpty()) return 0;
            double s = 0;
            for (double d : decodeMs) s += d;
            return s / decodeMs.size();
        }
    }

    public final ExportManifest manifest;
    private final OrtEnvironment env;
    private final OrtSession program;
    private final BankSlots bank;  // null: a merged export, nothing to switch
    private final Map<String, OrtLoraAdapter> slots = new HashMap<String, OrtLoraAdapter>();  // task -> its decoded slots
    private final Map<String, OrtSession.RunOptions> runOptions = new HashMap<String, OrtSession.RunOptions>();
    private final Map<String, Double> loadMs = new HashMap<String, Double>();
    private String active;
    private double lastSwitchMs;
    private OrtSession.Result past;  // holds the present.* tensors of the last step
    private int pos;
    private final int[] presentIndex;  // output position of present.i
    public final double sessionMs;

    public OrtRunner(ExportManifest manifest, int threads) throws OrtException, ExportException {
        this.manifest = manifest;
        long t0 = System.nanoTime();
        File programFile = manifest.verified(manifest.program());
        env = OrtEnvironment.getEnvironment();
        OrtSession.SessionOptions options = new OrtSession.SessionOptions();
        options.setIntraOpNumThreads(threads);
        options.setInterOpNumThreads(1);
        // the LoRA slots are inputs with defaults on purpose; ORT warns about each one
        options.setSessionLogLevel(OrtLoggingLevel.ORT_LOGGING_LEVEL_ERROR);
        program = env.createSession(programFile.getPath(), options);
        try {
            if (manifest.switchable()) {
                bank = new BankSlots(manifest.tasks, manifest.plan);
                bank.loadShared(manifest.verifiedShared());
            } else {
                bank = null;
            }
            List<String> outputs = new ArrayList<String>(program.getOutputNames());
            presentIndex = new int[2 * manifest.nLayers];
            for (int i = 0; i < presentIndex.length; i++) {
                presentIndex[i] = outputs.indexOf("present." + i);
                if (presentIndex[i] < 0) throw new ExportException(programFile + ": no output present." + i);
            }
            if (!"logits".equals(outputs.get(0))) throw new ExportException(programFile + ": first output is not logits");
        } catch (ExportException | RuntimeException e) {
            program.close();  // refused after the session opened: release it
            throw e;
        }
        sessionMs = (System.nanoTime() - t0) / 1e6;
    }

    public static String ortVersion() {
        return OrtEnvironment.getEnvironment().getVersion();
    }

    /** Verifies {@code task}'s own file (size and SHA-256 before reading it) and decodes its slots once; ms. */
    public double loadTask(String task) throws OrtException, ExportException {
        long t0 = System.nanoTime();
        if (bank == null) {
            if (!manifest.tasks.contains(task)) {
                throw new ExportException("this merged export serves only '" + manifest.tasks.get(0) + "', not '" + task + "'");
            }
            loadMs.put(task, (System.nanoTime() - t0) / 1e6);
            return loadMs.get(task);
        }
        Map<String, float[]> values = bank.taskSlots(task, manifest.verifiedTaskFile(task, null));
        List<LoraAdapterBytes.Tensor> tensors = new ArrayList<LoraAdapterBytes.Tensor>();
        for (Map.Entry<String, float[]> e : values.entrySet()) {
            int[] shape = manifest.plan.inputs.get(e.getKey());
            tensors.add(new LoraAdapterBytes.Tensor(e.getKey(), new long[] {shape[0], shape[1]}, e.getValue()));
        }
        OrtLoraAdapter taskSlots = OrtLoraAdapter.create(LoraAdapterBytes.write(tensors, 1, 1));
        OrtSession.RunOptions run = new OrtSession.RunOptions();
        run.addActiveLoraAdapter(taskSlots);
        OrtLoraAdapter oldSlots = slots.put(task, taskSlots);
        OrtSession.RunOptions oldRun = runOptions.put(task, run);
        if (oldRun != null) oldRun.close();
        if (oldSlots != null) oldSlots.close();
        double ms = (System.nanoTime() - t0) / 1e6;
        loadMs.put(task, ms);
        return ms;
    }

    /** Makes {@code task} the active one (loading it first if needed); returns the switch time in ms. */
    public double setTask(String task) throws OrtException, ExportException {
        if (!loadMs.containsKey(task)) loadTask(task);
        long t0 = System.nanoTime();
        active = task;
        lastSwitchMs = (System.nanoTime() - t0) / 1e6;
        return lastSwitchMs;
    }

    public String activeTask() { return active; }

    public Double loadMs(String task) { return loadMs.get(task); }

    public double lastSwitchMs() { return lastSwitchMs; }

    /** Logits (vocab) of the last position after feeding {@code ids} to a fresh sequence. */
    public float[] prefill(int[] ids) throws OrtException {
        if (past != null) { past.close(); past = null; }
        pos = 0;
        return step(ids);
    }

    public float[] decode(int token) throws OrtException {
        return step(new int[] {token});
    }

    private float[] step(int[] ids) throws OrtException {
        if (pos + ids.length > manifest.maxCacheLen) {
            throw new IllegalStateException("sequence of " + (pos + ids.length) + " tokens exceeds the export's "
                + manifest.maxCacheLen);
        }
        Map<String, OnnxTensor> feeds = new LinkedHashMap<String, OnnxTensor>();
        List<OnnxTensor> owned = new ArrayList<OnnxTensor>();
        try {
            long[] idArr = new long[ids.length];
            for (int i = 0; i < ids.length; i++) idArr[i] = ids[i];
            OnnxTensor input = OnnxTensor.createTensor(env, LongBuffer.wrap(idArr), new long[] {1, ids.length});
            owned.add(input);
            feeds.put("input_ids", input);
            for (int i = 0; i < 2 * manifest.nLayers; i++) {
                OnnxTensor p;
                if (past == null) {
                    p = OnnxTensor.createTensor(env, FloatBuffer.allocate(0), new long[] {1, manifest.kvHeads, 0, manifest.headDim});
                    owned.add(p);
                } else {
                    p = (OnnxTensor) past.get(presentIndex[i]);
                }
                feeds.put("past." + i, p);
            }
            OrtSession.RunOptions run = active == null ? null : runOptions.get(active);
            OrtSession.Result out = run == null ? program.run(feeds) : program.run(feeds, run);
            OnnxTensor logits = (OnnxTensor) out.get(0);
            long[] shape = logits.getInfo().getShape();
            int vocab = (int) shape[2];
            FloatBuffer all = logits.getFloatBuffer();
            float[] last = new float[vocab];
            all.position((int) ((shape[1] - 1) * vocab));
            all.get(last);
            if (past != null) past.close();
            past = out;
            pos += ids.length;
            return last;
        } finally {
            for (OnnxTensor t : owned) t.close();
        }
    }

    public static int argmax(float[] x) {
        int best = 0;
        for (int i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
        return best;
    }

    /** Greedy decoding from {@code prompt}; stops at an end-of-sequence id of the manifest or after {@code maxNew}. */
    public Generation greedy(int[] prompt, int maxNew, TokenListener listener) throws OrtException {
        Generation g = new Generation();
        long t0 = System.nanoTime();
        float[] logits = prefill(prompt);
        g.prefillMs = (System.nanoTime() - t0) / 1e6;
        int token = argmax(logits);
        while (true) {
            g.tokens.add(token);
            if (listener != null) listener.onToken(token);
            if (manifest.eosTokenIds.contains(token) || g.tokens.size() >= maxNew || pos >= manifest.maxCacheLen) return g;
            t0 = System.nanoTime();
            logits = decode(token);
            g.decodeMs.add((System.nanoTime() - t0) / 1e6);
            token = argmax(logits);
        }
    }

    @Override
    public void close() {
        if (past != null) past.close();
        for (OrtSession.RunOptions r : runOptions.values()) r.close();
        for (OrtLoraAdapter a : slots.values()) a.close();
        runOptions.clear();
        slots.clear();
        try {
            program.close();
        } catch (OrtException e) {
            throw new IllegalStateException(e);
        }
    }
}
