package org.hydraopt.demo;

import java.io.ByteArrayOutputStream;
import java.nio.charset.Charset;
import java.util.List;

/**
 * Writes ONNX Runtime's LoRA adapter format ({@code .onnx_adapter}: a FlatBuffer, identifier "TORT",
 * tables {@code Adapter{format_version, adapter_version, model_version, parameters}} and
 * {@code Parameter{name, dims, data_type, raw_data}}, from ORT's {@code adapter_schema.fbs}) for
 * fp32 tensors, so that the app can hand decoded LoRA slots to {@code OrtLoraAdapter.create(byte[])}.
 *
 * <p>Why: ORT's Java API refuses to feed inputs that have defaults (overridable initializers, which the
 * export's LoRA slots are): {@code OrtSession.run} counts only required inputs. An active adapter sets
 * them instead, which is ONNX Runtime's own multi-LoRA route. The layout is written front to back,
 * every object after the one that points to it, scalars aligned to their size, {@code raw_data} to 8.
 */
public final class LoraAdapterBytes {
    public static final int FORMAT_VERSION = 1;
    private static final int FLOAT = 1;  // TensorDataType.FLOAT

    /** One fp32 tensor. */
    public static final class Tensor {
        final String name;
        final long[] dims;
        final float[] data;

        public Tensor(String name, long[] dims, float[] data) {
            long n = 1;
            for (long d : dims) n *= d;
            if (n != data.length) throw new IllegalArgumentException(name + ": " + data.length + " values for shape of " + n);
            this.name = name;
            this.dims = dims;
            this.data = data;
        }
    }

    private final ByteArrayOutputStream out = new ByteArrayOutputStream();
    private byte[] buf = new byte[0];

    private LoraAdapterBytes() {}

    public static byte[] write(List<Tensor> tensors, int adapterVersion, int modelVersion) {
        LoraAdapterBytes w = new LoraAdapterBytes();
        return w.build(tensors, adapterVersion, modelVersion);
    }

    private int pos() { return out.size(); }

    private void pad(int align) { while (pos() % align != 0) out.write(0); }

    private void u16(int v) { out.write(v & 0xff); out.write((v >>> 8) & 0xff); }

    private void i32(int v) { for (int i = 0; i < 4; i++) out.write((v >>> (8 * i)) & 0xff); }

    private void i64(long v) { for (int i = 0; i < 8; i++) out.write((int) ((v >>> (8 * i)) & 0xff)); }

    private final java.util.Map<Integer, Integer> fixups = new java.util.HashMap<Integer, Integer>();  // uoffset field -> target

    private int placeholder() { int at = pos(); i32(0); return at; }

    private void point(int field, int target) { fixups.put(field, target); }

    /** A vtable followed by its table; returns the table's position (fields start 4 bytes after it). */
    private int table(int[] fieldOffsets, int tableSize) {
        pad(2);
        int vt = pos();
        u16(4 + 2 * fieldOffsets.length);
        u16(tableSize);
        for (int off : fieldOffsets) u16(off);
        pad(4);
        int table = pos();
        i32(table - vt);  // soffset: table - vtable
        return table;
    }

    private byte[] build(List<Tensor> tensors, int adapterVersion, int modelVersion) {
        int root = placeholder();
        out.write('T'); out.write('O'); out.write('R'); out.write('T');
        // Adapter: format_version @4, adapter_version @8, model_version @12, parameters @16
        int adapter = table(new int[] {4, 8, 12, 16}, 20);
        point(root, adapter);
        i32(FORMAT_VERSION);
        i32(adapterVersion);
        i32(modelVersion);
        int paramsField = placeholder();
        pad(4);
        point(paramsField, pos());
        i32(tensors.size());
        int[] slots = new int[tensors.size()];
        for (int i = 0; i < slots.length; i++) slots[i] = placeholder();
        for (int i = 0; i < slots.length; i++) {
            Tensor t = tensors.get(i);
            // Parameter: name @4, dims @8, data_type @12, raw_data @16
            int param = table(new int[] {4, 8, 12, 16}, 20);
            point(slots[i], param);
            int nameField = placeholder();
            int dimsField = placeholder();
            i32(FLOAT);
            int rawField = placeholder();
            byte[] name = t.name.getBytes(Charset.forName("UTF-8"));
            pad(4);
            point(nameField, pos());
            i32(name.length);
            out.write(name, 0, name.length);
            out.write(0);
            while (pos() % 8 != 4) out.write(0);  // int64 elements 8-aligned after the count
            point(dimsField, pos());
            i32(t.dims.length);
            for (long d : t.dims) i64(d);
            while (pos() % 8 != 4) out.write(0);  // raw_data force_align 8
            point(rawField, pos());
            i32(4 * t.data.length);
            for (float f : t.data) i32(Float.floatToRawIntBits(f));
        }
        pad(8);
        buf = out.toByteArray();
        for (java.util.Map.Entry<Integer, Integer> e : fixups.entrySet()) {
            int field = e.getKey(), rel = e.getValue() - field;
            for (int i = 0; i < 4; i++) buf[field + i] = (byte) ((rel >>> (8 * i)) & 0xff);
        }
        return buf;
    }
}
