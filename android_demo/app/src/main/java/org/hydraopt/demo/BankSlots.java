package org.hydraopt.demo;

import java.io.File;
import java.nio.ByteBuffer;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * Every LoRA slot of a task, decoded from the bank's own files: the Java port of
 * {@code exporters/targets/device_runner.py: BankSlots}, which every host runtime uses.
 *
 * <p>The export manifest's {@code bank} section (the bundle's {@code modules} and {@code layouts}) says,
 * per module, which factor of A and of B each task uses ({@code a_index[t]}, {@code b_index[t]}). A
 * factor used by one task lives in that task's file as parts {@code <m>.<A|B>.<part>}; any other in the
 * shared file as {@code <m>.<A|B><i>.<part>}: slices of the file's one blob, whose order and sizes the
 * layouts give ({@link Safetensors#readBankFile}). A factor is stored as component vectors (A's rows,
 * B's columns) in its layout's number format ({@code hydraopt_mobile/formats.py}): fp16 {@code w};
 * int8 codes {@code q} times one fp16 {@code scale} per vector; int4 codes packed two per byte (low
 * nibble first, two's complement) times one fp16 scale per group of G values, vectors zero-padded to
 * whole groups. Shared factors are decoded once ({@link #loadShared}), a task's own on each load
 * ({@link #taskSlots}); each slot is written into the signature's shape, zero where the factor's rank is
 * below the slot's (so {@code B A} is unchanged) and for modules the bank does not have. Where the program
 * stacks several modules' slots into one input (the manifest's {@code placement}: ONNX's q, k and v of one
 * attention, {@code exporters/onnx_fuse.py}), each module slot is then copied into its block of that input.
 */
public final class BankSlots {
    private static final Pattern INT4 = Pattern.compile("int4-g(32|64|128)");

    /** How one module's factors are stored and shared (one entry of the bundle's {@code layouts}). */
    static final class Layout {
        final String format;
        final int groupSize;  // int4 only
        final int[][] ranks;  // [A, B][factor]
        final int[][] index;  // [A, B][task]

        Layout(String format, int groupSize, int[][] ranks, int[][] index) {
            this.format = format;
            this.groupSize = groupSize;
            this.ranks = ranks;
            this.index = index;
        }

        /** How many tasks use factor {@code i} of {@code kind} (0: A, 1: B). */
        int users(int kind, int i) {
            int n = 0;
            for (int g : index[kind]) if (g == i) n++;
            return n;
        }
    }

    /** One module of the bank: its name, shape and layout. */
    static final class Module {
        final String name;
        final int dOut;
        final int dIn;
        final Layout layout;

        Module(String name, int dOut, int dIn, Layout layout) {
            this.name = name;
            this.dOut = dOut;
            this.dIn = dIn;
            this.layout = layout;
        }

        int length(int kind) { return kind == 0 ? dIn : dOut; }
    }

    /** One entry of the manifest's {@code placement}: a module slot's block inside a stacked program input. */
    static final class Placement {
        final String slot;
        final int rows;
        final int cols;
        final String input;
        final int row;
        final int col;

        Placement(String slot, int rows, int cols, String input, int row, int col) {
            this.slot = slot;
            this.rows = rows;
            this.cols = cols;
            this.input = input;
            this.row = row;
            this.col = col;
        }
    }

    /** The manifest's {@code slots}, {@code placement} and {@code bank}, checked against each other: what a runner needs. */
    public static final class Plan {
        /** the program's slot inputs: name -> shape, in the program's order. */
        public final Map<String, int[]> inputs;
        /** module slot name -> shape: what the bank's factors are decoded into (placed, or an input of its own). */
        final Map<String, int[]> slots;
        final List<Placement> placement;
        final List<Module> modules;

        private Plan(Map<String, int[]> inputs, Map<String, int[]> slots, List<Placement> placement, List<Module> modules) {
            this.inputs = inputs;
            this.slots = slots;
            this.placement = placement;
            this.modules = modules;
        }
    }

    private static final String[] KIND = {"A", "B"};
    private static final String[] SLOT = {"lora_a", "lora_b"};

    private final List<String> tasks;
    private final Plan plan;
    private final Map<String, float[]> shared = new HashMap<String, float[]>();  // "<m>.<A|B><i>" -> vectors

    public BankSlots(List<String> tasks, Plan plan) {
        this.tasks = tasks;
        this.plan = plan;
    }

    /** Decodes every factor of the shared file {@code path} (null: the export has none). */
    public void loadShared(File path) throws ExportException {
        List<Safetensors.Part> parts = new ArrayList<Safetensors.Part>();
        for (int m = 0; m < plan.modules.size(); m++) {
            Module mod = plan.modules.get(m);
            for (int kind = 0; kind < 2; kind++) {
                int[] ranks = mod.layout.ranks[kind];
                for (int i = 0; i < ranks.length; i++) {
                    if (ranks[i] != 0 && mod.layout.users(kind, i) > 1) parts.addAll(parts(m + "." + KIND[kind] + i + ".", mod.layout, mod.length(kind), ranks[i]));
                }
            }
        }
        Map<String, Safetensors.Tensor> tensors = path != null ? Safetensors.readBankFile(path, parts) : Collections.<String, Safetensors.Tensor>emptyMap();
        for (int m = 0; m < plan.modules.size(); m++) {
            Module mod = plan.modules.get(m);
            for (int kind = 0; kind < 2; kind++) {
                int[] ranks = mod.layout.ranks[kind];
                for (int i = 0; i < ranks.length; i++) {
                    if (ranks[i] == 0 || mod.layout.users(kind, i) == 1) continue;  // empty, or in a task's file
                    String key = m + "." + KIND[kind] + i;
                    shared.put(key, decode(tensors, key + ".", path, mod.layout, mod.length(kind), ranks[i]));
                }
            }
        }
    }

    /** program slot input -> fp32 values (row-major, the input's shape) for {@code task}, whose own file is {@code path} (null: none). */
    public Map<String, float[]> taskSlots(String task, File path) throws ExportException {
        int t = tasks.indexOf(task);
        if (t < 0) throw new ExportException("task '" + task + "' is not in this export");
        List<Safetensors.Part> parts = new ArrayList<Safetensors.Part>();
        for (int m = 0; m < plan.modules.size(); m++) {
            Module mod = plan.modules.get(m);
            for (int kind = 0; kind < 2; kind++) {
                int i = mod.layout.index[kind][t], rank = mod.layout.ranks[kind][i];
                if (rank != 0 && mod.layout.users(kind, i) == 1) parts.addAll(parts(m + "." + KIND[kind] + ".", mod.layout, mod.length(kind), rank));
            }
        }
        Map<String, Safetensors.Tensor> tensors = path != null ? Safetensors.readBankFile(path, parts) : Collections.<String, Safetensors.Tensor>emptyMap();
        Map<String, float[]> out = new LinkedHashMap<String, float[]>();
        for (Map.Entry<String, int[]> e : plan.slots.entrySet()) out.put(e.getKey(), new float[e.getValue()[0] * e.getValue()[1]]);
        for (int m = 0; m < plan.modules.size(); m++) {
            Module mod = plan.modules.get(m);
            for (int kind = 0; kind < 2; kind++) {
                int i = mod.layout.index[kind][t], rank = mod.layout.ranks[kind][i], length = mod.length(kind);
                if (rank == 0) continue;
                float[] vectors = mod.layout.users(kind, i) == 1
                    ? decode(tensors, m + "." + KIND[kind] + ".", path, mod.layout, length, rank)
                    : shared.get(m + "." + KIND[kind] + i);
                if (vectors == null) throw new IllegalStateException("loadShared was not called");
                String slot = mod.name + "." + SLOT[kind];
                float[] target = out.get(slot);
                if (kind == 0) {  // A (R, d_in): rows 0..rank-1 are the vectors
                    System.arraycopy(vectors, 0, target, 0, vectors.length);
                } else {  // B (d_out, R): columns 0..rank-1 are the vectors
                    int cols = plan.slots.get(slot)[1];
                    for (int c = 0; c < rank; c++) {
                        for (int j = 0; j < length; j++) target[j * cols + c] = vectors[c * length + j];
                    }
                }
            }
        }
        return plan.placement.isEmpty() ? out : placed(out);
    }

    /** The module slots {@code slots} as the program's inputs: each placed slot copied into its block of a
     * stacked input (zero elsewhere), the others as they are. */
    private Map<String, float[]> placed(Map<String, float[]> slots) {
        Map<String, float[]> out = new LinkedHashMap<String, float[]>();
        for (Map.Entry<String, int[]> e : plan.inputs.entrySet()) {
            float[] own = slots.get(e.getKey());
            out.put(e.getKey(), own != null ? own : new float[e.getValue()[0] * e.getValue()[1]]);
        }
        for (Placement p : plan.placement) {
            float[] from = slots.get(p.slot), to = out.get(p.input);
            int width = plan.inputs.get(p.input)[1];
            for (int r = 0; r < p.rows; r++) System.arraycopy(from, r * p.cols, to, (p.row + r) * width + p.col, p.cols);
        }
        return out;
    }

    /** The factor stored under {@code prefix}: {@code rank} vectors of {@code length} fp32 values, row-major. */
    private static float[] decode(Map<String, Safetensors.Tensor> tensors, String prefix, File path, Layout layout,
                                  int length, int rank) throws ExportException {
        String where = (path != null ? path.getPath() : "(the export has no shared file)") + ": tensors " + prefix + "*";
        Map<String, Safetensors.Tensor> parts = new HashMap<String, Safetensors.Tensor>();
        for (Map.Entry<String, Safetensors.Tensor> e : tensors.entrySet()) {
            if (e.getKey().startsWith(prefix)) parts.put(e.getKey().substring(prefix.length()), e.getValue());
        }
        float[] out = new float[rank * length];
        if (layout.format.equals("fp16")) {
            ByteBuffer w = part(parts, "w", "F16", new int[] {rank, length}, where, layout, 1).bytes();
            for (int k = 0; k < out.length; k++) out[k] = Safetensors.halfToFloat(w.getShort());
            return out;
        }
        boolean int4 = layout.groupSize > 0;
        int group = int4 ? layout.groupSize : length, groups = (length + group - 1) / group, padded = groups * group;
        ByteBuffer q = part(parts, "q", int4 ? "U8" : "I8", new int[] {rank, int4 ? padded / 2 : length}, where, layout, 2).bytes();
        ByteBuffer s = part(parts, "scale", "F16", new int[] {rank, groups}, where, layout, 2).bytes();
        float[] scale = new float[rank * groups];
        for (int k = 0; k < scale.length; k++) scale[k] = Safetensors.halfToFloat(s.getShort());
        for (int r = 0; r < rank; r++) {
            for (int j = 0; j < padded; j += int4 ? 2 : 1) {
                int b = q.get(), code0 = int4 ? nibble(b) : b, code1 = nibble(b >> 4);
                if (j < length) out[r * length + j] = code0 * scale[r * groups + j / group];
                if (int4 && j + 1 < length) out[r * length + j + 1] = code1 * scale[r * groups + (j + 1) / group];
            }
        }
        return out;
    }

    /** The parts one stored factor of {@code layout}'s format writes under {@code prefix} ({@code hydraopt_mobile/formats.py: encoded_shapes}). */
    private static List<Safetensors.Part> parts(String prefix, Layout layout, int length, int rank) {
        List<Safetensors.Part> out = new ArrayList<Safetensors.Part>();
        if (layout.format.equals("fp16")) {
            out.add(new Safetensors.Part(prefix + "w", "F16", new int[] {rank, length}));
            return out;
        }
        boolean int4 = layout.groupSize > 0;
        int group = int4 ? layout.groupSize : length, groups = (length + group - 1) / group, padded = groups * group;
        out.add(new Safetensors.Part(prefix + "q", int4 ? "U8" : "I8", new int[] {rank, int4 ? padded / 2 : length}));
        out.add(new Safetensors.Part(prefix + "scale", "F16", new int[] {rank, groups}));
        return out;
    }

    /** A 4-bit two's-complement code in [-8, 7] from the low nibble of {@code b}. */
    private static int nibble(int b) {
        int x = b & 0x0F;
        return x > 7 ? x - 16 : x;
    }

    private static Safetensors.Tensor part(Map<String, Safetensors.Tensor> parts, String name, String dtype, int[] shape,
                                           String where, Layout layout, int nParts) throws ExportException {
        Safetensors.Tensor t = parts.get(name);
        if (t == null || parts.size() != nParts) {
            throw new ExportException(where + " are not a " + layout.format + " factor of this bank (found parts "
                + new TreeSet<String>(parts.keySet()) + ")");
        }
        if (!t.dtype.equals(dtype) || !Arrays.equals(t.shape, shape)) {
            throw new ExportException(where + ": '" + name + "' is " + t.dtype + " " + Arrays.toString(t.shape) + ", the bank's layout says "
                + dtype + " " + Arrays.toString(shape) + " (" + layout.format + ")");
        }
        return t;
    }

    // --- the manifest's slots and bank, checked -------------------------------------------------

    /** Parses and checks the manifest's {@code slots}, {@code placement} and {@code bank} ({@code where}: the manifest, for messages). */
    static Plan plan(Object slotsJson, Object placementJson, Object bankJson, int nTasks, String where) throws ExportException {
        Map<String, int[]> inputs = new LinkedHashMap<String, int[]>();
        for (Object o : list(slotsJson, where, "slots")) {
            List<?> s = list(o, where, "a slots entry");
            if (s.size() != 2 || !(s.get(0) instanceof String)) throw new ExportException(where + ": a slots entry is not [name, shape]");
            int[] shape = ints(s.get(1), where, "the shape of slot " + s.get(0), 1);
            if (shape.length != 2 || (long) shape[0] * shape[1] > Integer.MAX_VALUE) {
                throw new ExportException(where + ": slot " + s.get(0) + " has shape " + Arrays.toString(shape));
            }
            if (inputs.put((String) s.get(0), shape) != null) throw new ExportException(where + ": slot " + s.get(0) + " listed twice");
        }
        List<Placement> placement = new ArrayList<Placement>();
        Map<String, int[]> slots = new LinkedHashMap<String, int[]>();
        TreeSet<String> targets = new TreeSet<String>();
        for (Object o : list(placementJson, where, "placement")) {
            List<?> p = list(o, where, "a placement entry");
            if (p.size() != 5 || !(p.get(0) instanceof String) || !(p.get(2) instanceof String)) {
                throw new ExportException(where + ": a placement entry is not [slot, [rows, columns], input, row, column]");
            }
            String slot = (String) p.get(0), input = (String) p.get(2);
            int[] shape = ints(p.get(1), where, "the shape of placed slot " + slot, 1);
            int[] at = ints(p.subList(3, 5), where, "the position of placed slot " + slot, 0);
            int[] into = inputs.get(input);
            if (shape.length != 2 || into == null || inputs.containsKey(slot) || slots.containsKey(slot)
                    || at[0] + shape[0] > into[0] || at[1] + shape[1] > into[1]) {
                throw new ExportException(where + ": placement of " + slot + ": not a block inside the program input " + input + ", or placed twice");
            }
            placement.add(new Placement(slot, shape[0], shape[1], input, at[0], at[1]));
            slots.put(slot, shape);
            targets.add(input);
        }
        for (Map.Entry<String, int[]> e : inputs.entrySet()) if (!targets.contains(e.getKey())) slots.put(e.getKey(), e.getValue());
        if (!(bankJson instanceof Map)) throw new ExportException(where + ": 'bank' must be an object");
        Map<?, ?> bank = (Map<?, ?>) bankJson;
        List<Layout> layouts = new ArrayList<Layout>();
        for (Object o : list(bank.get("layouts"), where, "bank.layouts")) layouts.add(layout(o, nTasks, where, layouts.size()));
        List<Module> modules = new ArrayList<Module>();
        for (Object o : list(bank.get("modules"), where, "bank.modules")) {
            List<?> e = list(o, where, "a bank.modules entry");
            if (e.size() != 4 || !(e.get(0) instanceof String)) throw new ExportException(where + ": a bank.modules entry is not [name, d_out, d_in, layout]");
            String name = (String) e.get(0);
            int[] dims = ints(e.subList(1, 4), where, "module " + name, 0);
            if (dims[2] >= layouts.size()) throw new ExportException(where + ": module " + name + " uses layout " + dims[2] + " of " + layouts.size());
            Module mod = new Module(name, dims[0], dims[1], layouts.get(dims[2]));
            for (int kind = 0; kind < 2; kind++) {
                int[] shape = slots.get(name + "." + SLOT[kind]);
                int rank = 0;
                for (int r : mod.layout.ranks[kind]) rank = Math.max(rank, r);
                if (shape == null) throw new ExportException(where + ": module " + name + " has no slot " + SLOT[kind] + " in the program");
                int slotRank = shape[kind == 0 ? 0 : 1], slotLength = shape[kind == 0 ? 1 : 0];
                if (slotLength != mod.length(kind)) {
                    throw new ExportException(where + ": module " + name + ": slot " + SLOT[kind] + " " + Arrays.toString(shape)
                        + " does not fit the module's " + mod.dOut + "x" + mod.dIn);
                }
                if (rank > slotRank) {
                    throw new ExportException(where + ": module " + name + ": the bank's rank " + rank + " exceeds the program's slot rank " + slotRank);
                }
            }
            modules.add(mod);
        }
        return new Plan(Collections.unmodifiableMap(inputs), Collections.unmodifiableMap(slots), Collections.unmodifiableList(placement),
                        Collections.unmodifiableList(modules));
    }

    private static Layout layout(Object o, int nTasks, String where, int n) throws ExportException {
        if (!(o instanceof Map)) throw new ExportException(where + ": bank layout " + n + " is not an object");
        Map<?, ?> l = (Map<?, ?>) o;
        Object format = l.get("format");
        Matcher int4 = INT4.matcher(String.valueOf(format));
        if (!"fp16".equals(format) && !"int8".equals(format) && !int4.matches()) {
            throw new ExportException(where + ": bank layout " + n + ": format " + format + " is not fp16, int8 or int4-g{32,64,128}");
        }
        String what = "bank layout " + n;
        int[][] ranks = {ints(l.get("a_ranks"), where, what + " a_ranks", 0), ints(l.get("b_ranks"), where, what + " b_ranks", 0)};
        int[][] index = {ints(l.get("a_index"), where, what + " a_index", 0), ints(l.get("b_index"), where, what + " b_index", 0)};
        for (int kind = 0; kind < 2; kind++) {
            String field = what + " " + KIND[kind].toLowerCase() + "_index";
            if (index[kind].length != nTasks) throw new ExportException(where + ": " + field + " indexes " + index[kind].length + " tasks, not " + nTasks);
            for (int i : index[kind]) {
                if (i >= ranks[kind].length) throw new ExportException(where + ": " + field + " names factor " + i + " of " + ranks[kind].length);
            }
        }
        return new Layout((String) format, int4.matches() ? Integer.parseInt(int4.group(1)) : 0, ranks, index);
    }

    private static List<?> list(Object v, String where, String what) throws ExportException {
        if (!(v instanceof List)) throw new ExportException(where + ": " + what + " must be a list");
        return (List<?>) v;
    }

    private static int[] ints(Object v, String where, String what, int min) throws ExportException {
        List<?> xs = list(v, where, what);
        int[] out = new int[xs.size()];
        for (int i = 0; i < out.length; i++) {
            Object x = xs.get(i);
            if (!(x instanceof Long) || (Long) x < min || (Long) x > (1 << 24)) throw new ExportException(where + ": " + what + " holds " + x);
            out[i] = ((Long) x).intValue();
        }
        return out;
    }
}
