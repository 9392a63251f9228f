package org.hydraopt.demo;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The device-runner protocol {@code hydraopt-device-runner/1}: token ids in, token ids and timings out;
 * tokenising and scoring stay on the host ({@code hydraopt bench android-adb}). The app's benchmark
 * mode runs it; any other target runner can speak it too.
 *
 * <p>Request (JSON file): {@code {"protocol": "hydraopt-device-runner/1", "export": DIR, "tasks": [..],
 * "prompts": {task: [[ids..], ..]}, "max_new_tokens": N, "threads": T}}.
 * Response (JSON file): {@code {"protocol", "target", "runtime", "export_id", "latency_kind": "measured",
 * "resident_bytes", "all_tasks_bytes", "session_ms", "tasks": [{"task", "task_bytes", "load_ms",
 * "switch_ms", "outputs": [{"prompt_tokens", "tokens", "prefill_ms", "decode_ms_per_token"}]}]}}, or
 * {@code {"protocol", "error": MESSAGE}} when the export or a task file is refused.
 */
public final class DeviceRunner {
    public static final String PROTOCOL = "hydraopt-device-runner/1";

    private DeviceRunner() {}

    @SuppressWarnings("unchecked")
    public static Map<String, Object> run(Map<String, Object> request, String target) {
        Map<String, Object> out = new LinkedHashMap<String, Object>();
        out.put("protocol", PROTOCOL);
        try {
            if (!PROTOCOL.equals(request.get("protocol"))) throw new ExportException("request protocol is " + request.get("protocol") + ", expected " + PROTOCOL);
            ExportManifest m = ExportManifest.read(new File((String) request.get("export")));
            int threads = request.get("threads") instanceof Long ? ((Long) request.get("threads")).intValue() : 1;
            int maxNew = ((Long) request.get("max_new_tokens")).intValue();
            Map<String, Object> prompts = (Map<String, Object>) request.get("prompts");
            OrtRunner runner = new OrtRunner(m, threads);
            try {
                out.put("target", target);
                out.put("runtime", "onnxruntime-android " + OrtRunner.ortVersion());
                out.put("export_id", m.exportId);
                out.put("latency_kind", "measured");
                out.put("threads", (long) threads);
                out.put("resident_bytes", m.residentBytes());
                out.put("all_tasks_bytes", m.allTasksBytes());
                out.put("session_ms", runner.sessionMs);
                List<Object> records = new ArrayList<Object>();
                for (Object t : (List<Object>) request.get("tasks")) {
                    String task = (String) t;
                    Map<String, Object> r = new LinkedHashMap<String, Object>();
                    r.put("task", task);
                    r.put("task_bytes", m.taskBytes(task));
                    r.put("load_ms", runner.loadTask(task));
                    r.put("switch_ms", runner.setTask(task));
                    List<Object> outputs = new ArrayList<Object>();
                    List<Object> ps = prompts != null && prompts.get(task) != null ? (List<Object>) prompts.get(task) : new ArrayList<Object>();
                    for (Object p : ps) {
                        List<Object> ids = (List<Object>) p;
                        int[] prompt = new int[ids.size()];
                        for (int i = 0; i < prompt.length; i++) prompt[i] = ((Long) ids.get(i)).intValue();
                        OrtRunner.Generation g = runner.greedy(prompt, maxNew, null);
                        Map<String, Object> o = new LinkedHashMap<String, Object>();
                        o.put("prompt_tokens", (long) prompt.length);
                        o.put("tokens", g.tokens);
                        o.put("prefill_ms", g.prefillMs);
                        o.put("decode_ms_per_token", g.msPerToken());
                        outputs.add(o);
                    }
                    r.put("outputs", outputs);
                    records.add(r);
                }
                out.put("tasks", records);
            } finally {
                runner.close();
            }
        } catch (Exception e) {
            out.put("error", e.getClass().getSimpleName() + ": " + e.getMessage());
        }
        return out;
    }

    /** Reads the request file, runs it, writes the response file (written whole, then renamed). */
    @SuppressWarnings("unchecked")
    public static Map<String, Object> runFiles(File request, File response, String target) throws IOException {
        Map<String, Object> req;
        try {
            req = (Map<String, Object>) Json.parse(ExportManifest.readUtf8(request));
        } catch (RuntimeException e) {
            req = new LinkedHashMap<String, Object>();
            req.put("protocol", "unreadable request: " + e.getMessage());
        }
        Map<String, Object> result = run(req, target);
        File tmp = new File(response.getPath() + ".tmp");
        OutputStream o = new FileOutputStream(tmp);
        try {
            o.write(Json.write(result).getBytes("UTF-8"));
        } finally {
            o.close();
        }
        if (!tmp.renameTo(response)) throw new IOException("cannot rename " + tmp + " to " + response);
        return result;
    }
}
