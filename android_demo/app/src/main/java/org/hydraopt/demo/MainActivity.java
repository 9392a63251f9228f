package org.hydraopt.demo;

import android.app.Activity;
import android.content.Intent;
import android.content.res.AssetManager;
import android.graphics.Typeface;
import android.os.Build;
import android.os.Bundle;
import android.os.Debug;
import android.util.Log;
import android.view.View;
import android.widget.AdapterView;
import android.widget.ArrayAdapter;
import android.widget.Button;
import android.widget.EditText;
import android.widget.LinearLayout;
import android.widget.ListView;
import android.widget.ScrollView;
import android.widget.TextView;
import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

/**
 * The demo: the export's tasks, a prompt and its streamed greedy answer, and what it costs.
 *
 * <p>The export comes from the intent extra {@code export} (a folder, e.g. pushed by adb to the app's
 * external files folder) or from the APK's {@code assets/export/}, copied once to the app's files folder.
 * With the extras {@code request} and {@code response} (files of the device-runner protocol) the activity
 * runs the benchmark mode instead ({@link DeviceRunner}) and finishes.
 */
public class MainActivity extends Activity {
    private static final String TAG = "hydraopt";
    private static final int MAX_NEW_TOKENS = 64;

    private ExportManifest manifest;
    private BpeTokenizer tokenizer;
    private OrtRunner runner;
    private TextView status;
    private TextView answer;
    private TextView panel;
    private EditText prompt;
    private final List<String> taskNames = new ArrayList<String>();
    private String panelTask;
    private OrtRunner.Generation lastGeneration;

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        final Intent intent = getIntent();
        if (intent.hasExtra("request") && intent.hasExtra("response")) {
            benchmarkMode(new File(intent.getStringExtra("request")), new File(intent.getStringExtra("response")));
            return;
        }
        buildUi();
        background(new Runnable() {
            public void run() {
                try {
                    File folder = intent.hasExtra("export") ? new File(intent.getStringExtra("export")) : copyAssetExport();
                    // sizes of every file now; checksums when each file is opened (program and shared file
                    // by OrtRunner, each task file when it is loaded, the tokenizer files here)
                    final ExportManifest m = ExportManifest.read(folder);
                    File tplFile = m.chatTemplate() != null ? m.verified(m.chatTemplate()) : null;
                    if (tplFile != null) ChatTemplate.check(ExportManifest.readUtf8(tplFile));
                    final BpeTokenizer tok = new BpeTokenizer(m.verified(m.tokenizerJson()));
                    final OrtRunner r = new OrtRunner(m, Math.min(4, Runtime.getRuntime().availableProcessors()));
                    runOnUiThread(new Runnable() {
                        public void run() {
                            manifest = m;
                            tokenizer = tok;
                            runner = r;
                            showTasks();
                        }
                    });
                } catch (final Exception e) {
                    fail(e);
                }
            }
        });
    }

    private void benchmarkMode(final File request, final File response) {
        TextView v = new TextView(this);
        v.setText("benchmark mode: " + request + " -> " + response);
        setContentView(v);
        background(new Runnable() {
            public void run() {
                try {
                    Map<String, Object> r = DeviceRunner.runFiles(request, response, "android-" + Build.SUPPORTED_ABIS[0] + "-" + Build.MODEL);
                    Log.i(TAG, "benchmark done: " + (r.containsKey("error") ? r.get("error") : response.getPath()));
                } catch (IOException e) {
                    Log.e(TAG, "benchmark failed", e);
                }
                runOnUiThread(new Runnable() {
                    public void run() { finish(); }
                });
            }
        });
    }

    private void buildUi() {
        LinearLayout root = new LinearLayout(this);
        root.setOrientation(LinearLayout.VERTICAL);
        root.setPadding(24, 24, 24, 24);
        status = new TextView(this);
        status.setText("loading the export...");
        root.addView(status);
        ListView list = new ListView(this);
        list.setId(1);
        list.setOnItemClickListener(new AdapterView.OnItemClickListener() {
            public void onItemClick(AdapterView<?> parent, View view, int position, long id) {
                selectTask(taskNames.get(position));
            }
        });
        root.addView(list, new LinearLayout.LayoutParams(LinearLayout.LayoutParams.MATCH_PARENT, 420));
        prompt = new EditText(this);
        prompt.setHint("prompt");
        root.addView(prompt);
        Button go = new Button(this);
        go.setText("Answer");
        go.setOnClickListener(new View.OnClickListener() {
            public void onClick(View v) { answer(prompt.getText().toString()); }
        });
        root.addView(go);
        answer = new TextView(this);
        answer.setTextSize(16);
        root.addView(answer);
        panel = new TextView(this);
        panel.setTypeface(Typeface.MONOSPACE);
        panel.setTextSize(12);
        root.addView(panel);
        ScrollView scroll = new ScrollView(this);
        scroll.addView(root);
        setContentView(scroll);
    }

    private void showTasks() {
        List<String> rows = new ArrayList<String>();
        taskNames.clear();
        for (String t : manifest.tasks) {
            taskNames.add(t);
            try {
                rows.add(t + "  (" + fmt(manifest.taskBytes(t)) + ")");
            } catch (ExportException e) {
                rows.add(t + "  (" + e.getMessage() + ")");
            }
        }
        ListView list = (ListView) findViewById(1);
        list.setAdapter(new ArrayAdapter<String>(this, android.R.layout.simple_list_item_1, rows));
        status.setText("export " + manifest.exportId + " (" + manifest.method + ", " + manifest.quant + "), ONNX Runtime "
            + OrtRunner.ortVersion() + "; session " + String.format("%.0f ms", runner.sessionMs) + ". Pick a task.");
        updatePanel();
    }

    private void selectTask(final String task) {
        if (runner == null) return;
        status.setText("switching to " + task + "...");
        background(new Runnable() {
            public void run() {
                try {
                    runner.setTask(task);
                    runOnUiThread(new Runnable() {
                        public void run() {
                            panelTask = task;
                            status.setText("task: " + task);
                            updatePanel();
                        }
                    });
                } catch (Exception e) {
                    fail(e);
                }
            }
        });
    }

    private void answer(final String text) {
        if (runner == null || text.trim().isEmpty()) return;
        answer.setText("");
        background(new Runnable() {
            public void run() {
                try {
                    int[] ids = tokenizer.encode(ChatTemplate.render(null, text));
                    final BpeTokenizer.Stream stream = tokenizer.new Stream(true);
                    final OrtRunner.Generation g = runner.greedy(ids, MAX_NEW_TOKENS, new OrtRunner.TokenListener() {
                        public void onToken(int token) {
                            final String piece = stream.push(token);
                            runOnUiThread(new Runnable() {
                                public void run() { answer.append(piece); }
                            });
                        }
                    });
                    runOnUiThread(new Runnable() {
                        public void run() {
                            lastGeneration = g;
                            updatePanel();
                        }
                    });
                } catch (Exception e) {
                    fail(e);
                }
            }
        });
    }

    private void updatePanel() {
        StringBuilder b = new StringBuilder();
        b.append("resident (program + shared factors): ").append(fmt(manifest.residentBytes())).append('\n');
        try {
            b.append("this task's file: ").append(panelTask != null ? fmt(manifest.taskBytes(panelTask)) : "-").append('\n');
            b.append("all ").append(manifest.tasks.size()).append(" tasks (shared + task files): ")
                .append(fmt(manifest.bytesOf("shared") + manifest.allTasksBytes())).append('\n');
            Long reference = manifest.oneAdapterPerTaskBytes();
            b.append("one-adapter-per-task (fp16): ").append(reference != null ? fmt(reference) : "not recorded by this bank").append('\n');
        } catch (ExportException e) {
            b.append(e.getMessage()).append('\n');
        }
        b.append("native heap now: ").append(fmt(Debug.getNativeHeapAllocatedSize())).append('\n');
        if (panelTask != null && runner.loadMs(panelTask) != null) {
            b.append(String.format("task load: %.2f ms, switch: %.4f ms%n", runner.loadMs(panelTask), runner.lastSwitchMs()));
        }
        if (lastGeneration != null) {
            b.append(String.format("prefill: %.1f ms, decode: %.1f ms/token (%d tokens)%n", lastGeneration.prefillMs,
                lastGeneration.msPerToken(), lastGeneration.tokens.size()));
        }
        panel.setText(b.toString());
    }

    private static String fmt(long bytes) {
        return String.format("%,d B (%.2f MB)", bytes, bytes / 1e6);
    }

    /** assets/export/ copied to the app's files folder once (the runtime reads files by path). */
    private File copyAssetExport() throws IOException {
        File target = new File(getFilesDir(), "export");
        if (new File(target, ExportManifest.MANIFEST).isFile()) return target;
        AssetManager assets = getAssets();
        String[] top = assets.list("export");
        if (top == null || top.length == 0) {
            throw new ExportException("no export in the APK (built with --no-export): start with the extra export=FOLDER");
        }
        File tmp = new File(getFilesDir(), "export.tmp");
        deleteTree(tmp);
        copyAssets(assets, "export", tmp);
        if (!tmp.renameTo(target)) throw new IOException("cannot move " + tmp + " to " + target);
        return target;
    }

    private static void copyAssets(AssetManager assets, String path, File to) throws IOException {
        String[] children = assets.list(path);
        if (children != null && children.length > 0) {
            if (!to.mkdirs() && !to.isDirectory()) throw new IOException("cannot create " + to);
            for (String c : children) copyAssets(assets, path + "/" + c, new File(to, c));
            return;
        }
        InputStream in = assets.open(path);
        OutputStream out = new FileOutputStream(to);
        try {
            byte[] buf = new byte[1 << 16];
            int n;
            while ((n = in.read(buf)) > 0) out.write(buf, 0, n);
        } finally {
            in.close();
            out.close();
        }
    }

    private static void deleteTree(File f) {
        File[] kids = f.listFiles();
        if (kids != null) for (File k : kids) deleteTree(k);
        f.delete();
    }

    private void fail(final Exception e) {
        Log.e(TAG, "error", e);
        runOnUiThread(new Runnable() {
            public void run() { status.setText("error: " + e.getMessage()); }
        });
    }

    /** One worker thread: loading, switching and generating never overlap (OrtRunner is not thread-safe). */
    private final ExecutorService worker = Executors.newSingleThreadExecutor();

    private void background(Runnable r) {
        worker.execute(r);
    }

    @Override
    protected void onDestroy() {
        worker.execute(new Runnable() {
            public void run() {
                if (runner != null) runner.close();
            }
        });
        worker.shutdown();
        super.onDestroy();
    }
}
