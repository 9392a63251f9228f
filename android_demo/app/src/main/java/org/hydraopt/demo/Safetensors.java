package org.hydraopt.demo;

import java.io.File;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Reads a safetensors file: an 8-byte little-endian header length, a JSON header
 * {@code {key: {dtype, shape, data_offsets}}} (plus an optional {@code __metadata__}), then the tensors'
 * little-endian bytes; every entry well formed, of a dtype the bank uses, its byte range inside the file
 * and of exactly the size its shape says; every refusal names the file and the tensor.
 *
 * <p>The bank's own files ({@code bank/shared.safetensors}, {@code bank/tasks/<task>.safetensors}) are
 * bundle format 3 ({@code hydraopt_mobile/storage.py}): one uint8 tensor {@code data} holding the file's
 * factor parts back to back, larger dtypes first, then by key; which parts, and their dtypes and shapes,
 * follow from the manifest's layouts ({@link #readBankFile}, as {@code exporters/targets/device_runner.py:
 * bank_file_entries}).
 */
public final class Safetensors {
    /** Bytes per element of the dtypes the bank writes (fp16 values and scales, int8 and packed int4 codes). */
    private static final Map<String, Integer> ITEM_SIZE = new LinkedHashMap<String, Integer>();

    static {
        ITEM_SIZE.put("F16", 2);
        ITEM_SIZE.put("F32", 4);
        ITEM_SIZE.put("I8", 1);
        ITEM_SIZE.put("U8", 1);
    }

    private static final long MAX_HEADER_BYTES = 16L << 20;

    /** One tensor: its dtype, shape and a little-endian view of its bytes. */
    public static final class Tensor {
        public final String dtype;
        public final int[] shape;
        private final ByteBuffer data;

        Tensor(String dtype, int[] shape, ByteBuffer data) {
            this.dtype = dtype;
            this.shape = shape;
            this.data = data;
        }

        /** A fresh little-endian view of the tensor's bytes (position 0). */
        public ByteBuffer bytes() {
            return data.duplicate().order(ByteOrder.LITTLE_ENDIAN);
        }
    }

    /** One part a bank file must hold: its key ({@code <m>.<A|B>[i].<part>}), dtype and shape. */
    public static final class Part {
        public final String key;
        public final String dtype;
        public final int[] shape;

        public Part(String key, String dtype, int[] shape) {
            this.key = key;
            this.dtype = dtype;
            this.shape = shape;
        }

        long nbytes() {
            long n = ITEM_SIZE.get(dtype);
            for (int d : shape) n *= d;
            return n;
        }
    }

    /** The bundle file format the bank's files must have (their {@code __metadata__.hydraopt_bundle}). */
    public static final String BANK_FILE_VERSION = "3";

    private Safetensors() {}

    /** The parts {@code parts} of the bank file {@code file} (bundle format 3): its one uint8 tensor {@code data},
     * checked to be exactly as long as the parts together, sliced in the file's order (larger dtypes first, then by key). */
    public static Map<String, Tensor> readBankFile(File file, List<Part> parts) throws ExportException {
        Map<String, String> metadata = new LinkedHashMap<String, String>();
        Map<String, Tensor> tensors = read(file, metadata);
        Tensor blob = tensors.get("data");
        String version = metadata.get("hydraopt_bundle");
        if (!BANK_FILE_VERSION.equals(version) || tensors.size() != 1 || blob == null || !blob.dtype.equals("U8") || blob.shape.length != 1) {
            throw new ExportException(file + ": not a bank file of bundle format " + BANK_FILE_VERSION + " (one uint8 tensor 'data'; this one: format "
                + version + ", tensors " + tensors.keySet() + "): export the bank again");
        }
        List<Part> order = new ArrayList<Part>(parts);
        Collections.sort(order, new Comparator<Part>() {
            @Override public int compare(Part a, Part b) {
                int bySize = ITEM_SIZE.get(b.dtype) - ITEM_SIZE.get(a.dtype);
                return bySize != 0 ? bySize : a.key.compareTo(b.key);
            }
        });
        long total = 0;
        for (Part p : order) total += p.nbytes();
        if (blob.shape[0] != total) {
            throw new ExportException(file + ": tensor 'data' holds " + blob.shape[0] + " bytes; the bank's layouts need " + total);
        }
        ByteBuffer bytes = blob.data;
        Map<String, Tensor> out = new LinkedHashMap<String, Tensor>();
        int at = 0;
        for (Part p : order) {
            int n = (int) p.nbytes();
            ByteBuffer slice = bytes.duplicate();
            slice.position(bytes.position() + at).limit(bytes.position() + at + n);
            out.put(p.key, new Tensor(p.dtype, p.shape, slice.slice()));
            at += n;
        }
        return Collections.unmodifiableMap(out);
    }

    /** Every tensor of {@code file}, in header order. */
    public static Map<String, Tensor> read(File file) throws ExportException {
        return read(file, new LinkedHashMap<String, String>());
    }

    /** Every tensor of {@code file}, in header order; its string {@code __metadata__} entries go into {@code metadata}. */
    private static Map<String, Tensor> read(File file, Map<String, String> metadata) throws ExportException {
        byte[] blob = ExportManifest.readBytes(file);
        if (blob.length < 8) throw new ExportException(file + ": not a safetensors file (" + blob.length + " bytes)");
        long n = ByteBuffer.wrap(blob, 0, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
        if (n < 2 || n > MAX_HEADER_BYTES || n > blob.length - 8) {
            throw new ExportException(file + ": not a safetensors file (header length " + n + " for " + blob.length + " bytes)");
        }
        Object parsed;
        try {
            parsed = Json.parse(new String(blob, 8, (int) n, "UTF-8"));
        } catch (IllegalArgumentException e) {
            throw new ExportException(file + ": not a safetensors file (" + e.getMessage() + ")");
        } catch (IOException e) {
            throw new ExportException(file + ": " + e.getMessage());
        }
        if (!(parsed instanceof Map)) throw new ExportException(file + ": not a safetensors file (header is not an object)");
        long base = 8 + n, size = blob.length - base;
        Map<String, Tensor> out = new LinkedHashMap<String, Tensor>();
        for (Map.Entry<?, ?> e : ((Map<?, ?>) parsed).entrySet()) {
            String key = (String) e.getKey();
            if (key.equals("__metadata__")) {
                if (e.getValue() instanceof Map) {
                    for (Map.Entry<?, ?> m : ((Map<?, ?>) e.getValue()).entrySet()) {
                        if (m.getValue() instanceof String) metadata.put((String) m.getKey(), (String) m.getValue());
                    }
                }
                continue;
            }
            String where = file + ": tensor '" + key + "'";
            if (!(e.getValue() instanceof Map)) throw new ExportException(where + ": malformed header entry");
            Map<?, ?> info = (Map<?, ?>) e.getValue();
            Object dtype = info.get("dtype");
            if (!(dtype instanceof String) || !ITEM_SIZE.containsKey(dtype)) {
                throw new ExportException(where + ": dtype " + dtype + " is not one of " + ITEM_SIZE.keySet());
            }
            int[] shape = shape(info.get("shape"), where);
            long[] offsets = offsets(info.get("data_offsets"), where);
            long count = 1;
            for (int d : shape) count *= d;  // each d < 2^31 and count checked below: no overflow
            if (count > Integer.MAX_VALUE || offsets[0] < 0 || offsets[0] > offsets[1] || offsets[1] > size
                || offsets[1] - offsets[0] != count * ITEM_SIZE.get(dtype)) {
                throw new ExportException(where + ": its bytes [" + offsets[0] + ", " + offsets[1] + ") do not match its shape "
                    + java.util.Arrays.toString(shape) + " of " + dtype + " or lie outside the file's " + size + " data bytes");
            }
            ByteBuffer data = ByteBuffer.wrap(blob, (int) (base + offsets[0]), (int) (offsets[1] - offsets[0])).slice();
            out.put(key, new Tensor((String) dtype, shape, data));
        }
        return Collections.unmodifiableMap(out);
    }

    private static int[] shape(Object v, String where) throws ExportException {
        if (!(v instanceof List)) throw new ExportException(where + ": malformed header entry (shape)");
        List<?> dims = (List<?>) v;
        int[] shape = new int[dims.size()];
        for (int i = 0; i < shape.length; i++) {
            Object d = dims.get(i);
            if (!(d instanceof Long) || (Long) d < 0 || (Long) d > Integer.MAX_VALUE) {
                throw new ExportException(where + ": malformed header entry (shape " + dims + ")");
            }
            shape[i] = ((Long) d).intValue();
        }
        return shape;
    }

    private static long[] offsets(Object v, String where) throws ExportException {
        if (!(v instanceof List) || ((List<?>) v).size() != 2) throw new ExportException(where + ": malformed header entry (data_offsets)");
        long[] o = new long[2];
        for (int i = 0; i < 2; i++) {
            Object x = ((List<?>) v).get(i);
            if (!(x instanceof Long)) throw new ExportException(where + ": malformed header entry (data_offsets " + v + ")");
            o[i] = (Long) x;
        }
        return o;
    }

    /** IEEE 754 binary16 bits to float (Android's Half needs API 26; Float.float16ToFloat Java 20). */
    public static float halfToFloat(short bits) {
        int h = bits & 0xffff, sign = (h & 0x8000) << 16, exp = (h >>> 10) & 0x1f, mant = h & 0x3ff;
        if (exp == 0x1f) return Float.intBitsToFloat(sign | 0x7f800000 | (mant << 13));  // inf, NaN
        if (exp != 0) return Float.intBitsToFloat(sign | ((exp + 112) << 23) | (mant << 13));
        float sub = mant * 5.9604645e-8f;  // 2^-24: subnormals and zero
        return sign != 0 ? -sub : sub;
    }
}
