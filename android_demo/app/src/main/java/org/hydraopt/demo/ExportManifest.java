package org.hydraopt.demo;

import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.regex.Pattern;

/**
 * The only class that knows the layout of an export made by {@code hydraopt export --format onnx}
 * (schema {@code hydraopt-export/4}, written by {@code exporters/export.py} and
 * {@code exporters/manifest.py}): {@code manifest.json}; the program {@code model.onnx}, whose inputs
 * hold every LoRA slot of its signature ({@code slots}; q, k and v of one attention stacked in one pair,
 * each module's block given by {@code placement}); the bank's own files under {@code bank/}: the
 * shared file (factors used by several tasks, role {@code shared}), one file per task with the factors
 * only it uses (role {@code task}; a task whose factors are all shared has none), the bundle manifest
 * (role {@code bank}); the {@code bank} section saying which factor fills which slot
 * ({@link BankSlots}); and the tokenizer folder. When the export format changes, this class changes;
 * the runtime, the UI and the benchmark mode use its getters.
 *
 * <p>Rules applied to a manifest (hostile or careless inputs): the schema and runtime must be the
 * expected ones; every field has its type; task names are plain names; every path is relative, without
 * {@code ..} or empty segments, and stays inside the export folder after resolving links; one program
 * file, at most one shared file, at most one file per task and only for listed tasks; every placed
 * block lies inside its input; the slots fit the bank's modules and ranks; every file exists with the manifest's byte count; a file is read only after
 * its size and SHA-256 match.
 */
public final class ExportManifest {
    public static final String MANIFEST = "manifest.json";
    public static final String SCHEMA = "hydraopt-export/4";
    public static final String RUNTIME = "onnxruntime";
    private static final Pattern TASK_NAME = Pattern.compile("[A-Za-z0-9][A-Za-z0-9._-]{0,63}");
    private static final Pattern SHA256 = Pattern.compile("[0-9a-f]{64}");
    private static final long MAX_MANIFEST_BYTES = 16L << 20;
    private static final List<String> ROLES = java.util.Arrays.asList("program", "shared", "task", "bank", "reference", "tokenizer");

    /** One file of the export, as the manifest lists it. */
    public static final class FileEntry {
        public final String path;
        public final long bytes;
        public final String sha256;
        public final String role;
        public final String task;

        FileEntry(String path, long bytes, String sha256, String role, String task) {
            this.path = path;
            this.bytes = bytes;
            this.sha256 = sha256;
            this.role = role;
            this.task = task;
        }
    }

    public final File folder;
    public final String exportId;
    public final String quant;
    public final String method;
    public final List<String> tasks;
    public final List<FileEntry> files;
    public final int nLayers;
    public final int kvHeads;
    public final int headDim;
    public final int vocabSize;
    public final int maxCacheLen;
    public final Set<Integer> eosTokenIds;
    /** Which factor of which bank file fills which program input; null for a merged export (no slots). */
    public final BankSlots.Plan plan;
    private Long oneAdapterPerTaskBytes;

    private ExportManifest(File folder, Map<String, Object> m) throws ExportException {
        this.folder = folder;
        Object schema = m.get("schema");
        if (!SCHEMA.equals(schema)) {
            throw new ExportException(where() + ": not a " + SCHEMA + " manifest (schema " + schema + ")");
        }
        String runtime = str(m, "runtime");
        if (!RUNTIME.equals(runtime)) {
            throw new ExportException(where() + ": an export for " + runtime + "; this app runs " + RUNTIME
                + " exports (hydraopt export --format onnx)");
        }
        exportId = str(m, "export_id");
        quant = str(m, "quant");
        method = str(m, "method");
        List<String> names = new ArrayList<String>();
        for (Object t : list(m, "tasks")) {
            if (!(t instanceof String) || !TASK_NAME.matcher((String) t).matches()) {
                throw new ExportException(where() + ": task name " + t + " is not a plain name");
            }
            if (names.contains(t)) throw new ExportException(where() + ": task " + t + " listed twice");
            names.add((String) t);
        }
        if (names.isEmpty()) throw new ExportException(where() + ": no tasks");
        tasks = Collections.unmodifiableList(names);
        List<FileEntry> entries = new ArrayList<FileEntry>();
        Set<String> paths = new HashSet<String>();
        for (Object o : list(m, "files")) {
            if (!(o instanceof Map)) throw new ExportException(where() + ": a files entry is not an object");
            @SuppressWarnings("unchecked") Map<String, Object> f = (Map<String, Object>) o;
            String path = str(f, "path");
            checkPath(path);
            if (!paths.add(path)) throw new ExportException(where() + ": " + path + " listed twice");
            long bytes = num(f, "bytes");
            if (bytes < 0) throw new ExportException(where() + ": " + path + " has negative bytes");
            String sha = str(f, "sha256");
            if (!SHA256.matcher(sha).matches()) throw new ExportException(where() + ": " + path + ": sha256 is not 64 hex digits");
            String role = str(f, "role");
            Object task = f.get("task");
            if (task != null && !(task instanceof String)) throw new ExportException(where() + ": " + path + ": task is not a string");
            if (!ROLES.contains(role)) throw new ExportException(where() + ": " + path + ": unknown role " + role);
            if (role.equals("task") && !names.contains(task)) {
                throw new ExportException(where() + ": " + path + " is a task file for " + task + ", which is not a task of this export");
            }
            if (!role.equals("task") && task != null) throw new ExportException(where() + ": " + path + ": a " + role + " file names task " + task);
            entries.add(new FileEntry(path, bytes, sha, role, (String) task));
        }
        files = Collections.unmodifiableList(entries);
        one("program", null);
        find("shared", null);
        for (String t : tasks) find("task", t);
        checkTaskFiles(map(m, "task_files"), paths);
        List<?> slots = list(m, "slots");
        plan = slots.isEmpty() ? null : BankSlots.plan(slots, m.get("placement"), m.get("bank"), tasks.size(), where());
        if (plan == null && bytesOf("task") + bytesOf("shared") > 0) {
            throw new ExportException(where() + ": an export without slots (a merged export) has task or shared files");
        }
        tokenizerJson();
        Map<String, Object> model = map(m, "model");
        nLayers = positive(model, "n_layers");
        kvHeads = positive(model, "kv_heads");
        headDim = positive(model, "head_dim");
        vocabSize = positive(model, "vocab_size");
        maxCacheLen = positive(model, "max_cache_len");
        Set<Integer> eos = new HashSet<Integer>();
        for (Object e : list(model, "eos_token_id")) {
            if (!(e instanceof Long)) throw new ExportException(where() + ": eos_token_id holds " + e);
            eos.add(((Long) e).intValue());
        }
        eosTokenIds = Collections.unmodifiableSet(eos);
        for (FileEntry f : files) {  // presence and size of every file, before anything is read
            File file = resolve(f);
            if (!file.isFile()) throw new ExportException(file + ": missing (listed in " + where() + ")");
            if (file.length() != f.bytes) {
                throw new ExportException(file + ": " + file.length() + " bytes, but export " + exportId + " wrote "
                    + f.bytes + "; it is truncated or belongs to another export");
            }
        }
    }

    /** Reads and checks {@code folder/manifest.json} (sizes of all files, not yet their checksums). */
    public static ExportManifest read(File folder) throws ExportException {
        File path = new File(folder, MANIFEST);
        if (!path.isFile()) throw new ExportException(folder + ": no " + MANIFEST + "; not an export folder");
        if (path.length() > MAX_MANIFEST_BYTES) throw new ExportException(path + ": " + path.length() + " bytes, too large for a manifest");
        return new ExportManifest(folder, jsonObject(path));
    }

    /** The JSON object in {@code file}; refused with the file's name when it is not one. */
    static Map<String, Object> jsonObject(File file) throws ExportException {
        Object parsed;
        try {
            parsed = Json.parse(readUtf8(file));
        } catch (IllegalArgumentException e) {
            throw new ExportException(file + ": " + e.getMessage());
        } catch (IOException e) {
            throw new ExportException(file + ": " + e.getMessage());
        }
        if (!(parsed instanceof Map)) throw new ExportException(file + ": not a JSON object");
        @SuppressWarnings("unchecked") Map<String, Object> m = (Map<String, Object>) parsed;
        return m;
    }

    // --- files -------------------------------------------------------------------------------

    public FileEntry program() throws ExportException { return one("program", null); }

    /** The bank's shared file (factors used by several tasks), or null when the bank has none. */
    public FileEntry shared() throws ExportException { return find("shared", null); }

    /** Whether tasks switch at run time (the program has LoRA slots), rather than a merged export of one task. */
    public boolean switchable() { return plan != null; }

    /** {@code task}'s own file (the factors only it uses), or null when every factor it uses is shared. */
    public FileEntry taskEntry(String task) throws ExportException {
        if (!tasks.contains(task)) {
            throw new ExportException("task '" + task + "' is not in export " + exportId + " (tasks: " + join(tasks) + ")");
        }
        return find("task", task);
    }

    public FileEntry tokenizerJson() throws ExportException {
        for (FileEntry f : files) {
            if (f.role.equals("tokenizer") && f.path.endsWith("/tokenizer.json")) return f;
        }
        throw new ExportException(where() + ": no tokenizer/tokenizer.json (the app tokenizes on the device)");
    }

    public FileEntry chatTemplate() {
        for (FileEntry f : files) {
            if (f.role.equals("tokenizer") && f.path.endsWith("/chat_template.jinja")) return f;
        }
        return null;
    }

    /** The path of {@code f} inside the export folder. */
    public File resolve(FileEntry f) {
        return new File(folder, f.path);
    }

    /** The file of {@code f} after checking its size and SHA-256 against the manifest. */
    public File verified(FileEntry f) throws ExportException {
        return verified(f, resolve(f));
    }

    /** {@code task}'s own file after its checks (null: it has none); {@code override} reads it from elsewhere (a file shipped separately). */
    public File verifiedTaskFile(String task, File override) throws ExportException {
        FileEntry f = taskEntry(task);
        if (f == null) return null;
        return verified(f, override != null ? override : resolve(f));
    }

    /** The shared file after its checks, or null when the bank has none. */
    public File verifiedShared() throws ExportException {
        FileEntry f = shared();
        return f == null ? null : verified(f);
    }

    private File verified(FileEntry f, File file) throws ExportException {
        String what = f.role.equals("task") ? "task file for '" + f.task + "'" : f.role + " file";
        if (!file.isFile()) throw new ExportException(file + ": " + what + " is missing");
        if (file.length() != f.bytes) {
            throw new ExportException(file + ": " + file.length() + " bytes, but export " + exportId + " wrote " + f.bytes
                + " for its " + what + "; it is truncated or belongs to another export");
        }
        String digest = sha256(file);
        if (!digest.equals(f.sha256)) {
            String hint = " (from another export, or corrupted)";
            for (FileEntry o : files) {
                if (o.role.equals("task") && o.sha256.equals(digest)) hint = " (it is this export's file for '" + o.task + "')";
            }
            throw new ExportException(file + ": SHA-256 " + digest.substring(0, 16) + "... does not match export " + exportId
                + "'s " + what + " (" + f.sha256.substring(0, 16) + "...)" + hint + "; refusing to load it");
        }
        return file;
    }

    /** Checks every file's size and SHA-256. */
    public void verifyAll() throws ExportException {
        for (FileEntry f : files) verified(f);
    }

    // --- bytes (manifest figures; equal to the files' sizes, which read() checked) --------------

    public long bytesOf(String role) {
        long n = 0;
        for (FileEntry f : files) if (f.role.equals(role)) n += f.bytes;
        return n;
    }

    /** What stays loaded whatever the task: the program and the bank's shared file. */
    public long residentBytes() { return bytesOf("program") + bytesOf("shared"); }

    /** The bytes of {@code task}'s own file (0: every factor it uses is shared). */
    public long taskBytes(String task) throws ExportException {
        FileEntry f = taskEntry(task);
        return f == null ? 0 : f.bytes;
    }

    public long allTasksBytes() { return bytesOf("task"); }

    /** Everything the device stores for this model and all its tasks (resident + task files). */
    public long deviceBytes() { return residentBytes() + allTasksBytes(); }

    public long totalFileBytes() {
        long n = 0;
        for (FileEntry f : files) n += f.bytes;
        return n;
    }

    // --- helpers -----------------------------------------------------------------------------

    private String where() { return new File(folder, MANIFEST).getPath(); }

    private FileEntry one(String role, String task) throws ExportException {
        FileEntry found = find(role, task);
        if (found == null) throw new ExportException(where() + ": no " + role + " file" + (task != null ? " for task '" + task + "'" : ""));
        return found;
    }

    /** The file of {@code role} (and {@code task}), null when there is none; two are refused. */
    private FileEntry find(String role, String task) throws ExportException {
        FileEntry found = null;
        for (FileEntry f : files) {
            if (f.role.equals(role) && (task == null ? f.task == null : task.equals(f.task))) {
                if (found != null) throw new ExportException(where() + ": two " + role + " files" + (task != null ? " for " + task : ""));
                found = f;
            }
        }
        return found;
    }

    /** {@code task_files}: each listed task's data files, all of them files of this manifest. */
    private void checkTaskFiles(Map<String, Object> taskFiles, Set<String> paths) throws ExportException {
        for (Map.Entry<String, Object> e : taskFiles.entrySet()) {
            if (!tasks.contains(e.getKey())) throw new ExportException(where() + ": task_files names task " + e.getKey() + ", not a task of this export");
            for (Object p : list(taskFiles, e.getKey())) {
                if (!paths.contains(p)) throw new ExportException(where() + ": task_files of " + e.getKey() + " names " + p + ", not a file of this export");
            }
        }
    }

    private void checkPath(String path) throws ExportException {
        if (path.isEmpty() || path.startsWith("/") || path.contains("\\") || path.contains(":") || path.indexOf('\0') >= 0) {
            throw new ExportException(where() + ": path '" + path + "' is not a plain relative path inside the export");
        }
        for (String part : path.split("/", -1)) {
            if (part.isEmpty() || part.equals(".") || part.equals("..")) {
                throw new ExportException(where() + ": path '" + path + "' leaves the export folder or has empty parts");
            }
        }
        try {
            String root = folder.getCanonicalPath() + File.separator;
            String full = new File(folder, path).getCanonicalPath();
            if (!full.startsWith(root)) {
                throw new ExportException(where() + ": path '" + path + "' resolves to " + full + ", outside the export folder");
            }
        } catch (IOException e) {
            throw new ExportException(where() + ": path '" + path + "': " + e.getMessage());
        }
    }

    /**
     * fp16 file bytes of the tasks' own adapters, one per task (the storage unit's reference), from the
     * bundle manifest ({@code reference_file_bytes}) after its checksum; null when the bank does not record it.
     */
    public Long oneAdapterPerTaskBytes() throws ExportException {
        if (oneAdapterPerTaskBytes == null) {
            FileEntry bank = find("bank", null);
            if (bank == null) return null;
            File file = verified(bank);
            Object v = jsonObject(file).get("reference_file_bytes");
            if (!(v instanceof Long) || (Long) v < 0) throw new ExportException(file + ": reference_file_bytes is " + v);
            oneAdapterPerTaskBytes = (Long) v;
        }
        return oneAdapterPerTaskBytes > 0 ? oneAdapterPerTaskBytes : null;
    }

    /** {@code m.get(key)} when it is a {@code type}; refused naming the manifest, the key, and what it is instead. */
    private <T> T field(Map<String, Object> m, String key, Class<T> type, String what) throws ExportException {
        Object v = m.get(key);
        if (!type.isInstance(v)) throw new ExportException(where() + ": '" + key + "' must be " + what + ", not " + v);
        return type.cast(v);
    }

    private String str(Map<String, Object> m, String key) throws ExportException {
        return field(m, key, String.class, "a string");
    }

    private long num(Map<String, Object> m, String key) throws ExportException {
        return field(m, key, Long.class, "an integer");
    }

    private int positive(Map<String, Object> m, String key) throws ExportException {
        long v = num(m, key);
        if (v <= 0 || v > Integer.MAX_VALUE) throw new ExportException(where() + ": '" + key + "' is " + v);
        return (int) v;
    }

    private List<?> list(Map<String, Object> m, String key) throws ExportException {
        return field(m, key, List.class, "a list");
    }

    @SuppressWarnings("unchecked")  // Json gives objects as Map<String, Object>
    private Map<String, Object> map(Map<String, Object> m, String key) throws ExportException {
        return (Map<String, Object>) field(m, key, Map.class, "an object");
    }

    private static String join(List<String> xs) {
        StringBuilder b = new StringBuilder();
        for (String x : xs) b.append(b.length() == 0 ? "" : ", ").append(x);
        return b.toString();
    }

    public static String sha256(File file) throws ExportException {
        try {
            MessageDigest md = MessageDigest.getInstance("SHA-256");
            InputStream in = new FileInputStream(file);
            try {
                byte[] buf = new byte[1 << 16];
                int n;
                while ((n = in.read(buf)) > 0) md.update(buf, 0, n);
            } finally {
                in.close();
            }
            StringBuilder b = new StringBuilder();
            for (byte x : md.digest()) b.append(String.format("%02x", x & 0xff));
            return b.toString();
        } catch (IOException e) {
            throw new ExportException(file + ": " + e.getMessage());
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    public static String readUtf8(File file) throws IOException {
        return new String(readBytes(file), "UTF-8");
    }

    /** The whole of {@code file}; refused with the file's name when it cannot be read in full. */
    public static byte[] readBytes(File file) throws ExportException {
        long length = file.length();
        if (length > Integer.MAX_VALUE) throw new ExportException(file + ": " + length + " bytes, too large to read at once");
        byte[] data = new byte[(int) length];
        try {
            InputStream in = new FileInputStream(file);
            try {
                int off = 0;
                while (off < data.length) {
                    int n = in.read(data, off, data.length - off);
                    if (n < 0) throw new ExportException(file + ": shorter than its size");
                    off += n;
                }
            } finally {
                in.close();
            }
        } catch (ExportException e) {
            throw e;
        } catch (IOException e) {
            throw new ExportException(file + ": " + e.getMessage());
        }
        return data;
    }
}
