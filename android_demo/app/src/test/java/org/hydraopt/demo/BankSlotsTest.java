package org.hydraopt.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.hydraopt.demo.TestData.assertContains;
import static org.junit.Assert.fail;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import org.junit.Test;

/**
 * The bank's files decoded in Java ({@link Safetensors}, {@link BankSlots}) against the host's decoder
 * ({@code exporters/targets/device_runner.py: BankSlots}, numpy), whose every-task slots
 * tests/test_android.py writes to the reference file; and the refusals of malformed bank files.
 */
public class BankSlotsTest extends ExportCopy {

    private static Map<String, Map<String, float[]>> decodeAll(ExportManifest m) throws ExportException {
        BankSlots bank = new BankSlots(m.tasks, m.plan);
        bank.loadShared(m.verifiedShared());
        Map<String, Map<String, float[]>> out = new java.util.LinkedHashMap<String, Map<String, float[]>>();
        for (String t : m.tasks) out.put(t, bank.taskSlots(t, m.verifiedTaskFile(t, null)));
        return out;
    }

    @Test
    @SuppressWarnings("unchecked")
    public void everyTaskDecodesBitIdenticallyToThePythonRuntime() throws Exception {
        ExportManifest m = ExportManifest.read(export);
        Set<String> formats = new HashSet<String>();
        for (Object l : (List<Object>) ((Map<String, Object>) TestData.manifestJson(export).get("bank")).get("layouts")) {
            formats.add((String) ((Map<String, Object>) l).get("format"));
        }
        assertEquals("the test bank stores factors in every number format", 3, formats.size());
        Map<String, Object> ref = (Map<String, Object>) Json.parse(ExportManifest.readUtf8(TestData.required("hydraopt.slots.reference")));
        Map<String, Map<String, float[]>> got = decodeAll(m);
        assertEquals(ref.keySet(), got.keySet());
        int nonzero = 0;
        for (String task : m.tasks) {
            Map<String, Object> want = (Map<String, Object>) ref.get(task);
            assertEquals(want.keySet(), got.get(task).keySet());
            for (Map.Entry<String, float[]> e : got.get(task).entrySet()) {
                List<Object> w = (List<Object>) want.get(e.getKey());
                assertEquals(w.size(), e.getValue().length);
                for (int i = 0; i < w.size(); i++) {
                    float expect = ((Number) w.get(i)).floatValue();
                    if (Float.floatToIntBits(expect) != Float.floatToIntBits(e.getValue()[i])) {
                        fail(task + " " + e.getKey() + "[" + i + "]: Java " + e.getValue()[i] + ", numpy " + expect);
                    }
                    if (expect != 0) nonzero++;
                }
            }
        }
        assertTrue(nonzero > 1000);
    }

    @Test
    @SuppressWarnings("unchecked")
    public void slotsWiderThanTheBankAreZeroPadded() throws Exception {
        Map<String, Map<String, float[]>> plain = decodeAll(ExportManifest.read(export));
        Map<String, Object> raw = TestData.manifestJson(export);
        for (Object o : (List<Object>) raw.get("slots")) {  // every slot two components wider
            List<Object> shape = (List<Object>) ((List<Object>) o).get(1);
            int k = ((String) ((List<Object>) o).get(0)).endsWith(".lora_a") ? 0 : 1;
            shape.set(k, (Long) shape.get(k) + 2);
        }
        TestData.writeManifest(export, raw);
        ExportManifest m = ExportManifest.read(export);
        Map<String, Map<String, float[]>> padded = decodeAll(m);
        for (String task : m.tasks) {
            for (Map.Entry<String, float[]> e : padded.get(task).entrySet()) {
                int[] shape = m.plan.inputs.get(e.getKey());
                float[] p = e.getValue(), q = plain.get(task).get(e.getKey());
                boolean isA = e.getKey().endsWith(".lora_a");
                int cols = shape[1], oldCols = isA ? cols : cols - 2;
                for (int r = 0; r < shape[0]; r++) {
                    for (int c = 0; c < cols; c++) {
                        boolean extra = isA ? r >= shape[0] - 2 : c >= oldCols;
                        float want = extra ? 0f : q[r * oldCols + c];
                        assertEquals(task + " " + e.getKey() + " [" + r + "," + c + "]", want, p[r * cols + c], 0f);
                    }
                }
            }
        }
    }

    @Test
    public void halfPrecisionDecodesEveryKindOfValue() {
        assertEquals(1f, Safetensors.halfToFloat((short) 0x3C00), 0f);
        assertEquals(-2f, Safetensors.halfToFloat((short) 0xC000), 0f);
        assertEquals(65504f, Safetensors.halfToFloat((short) 0x7BFF), 0f);
        assertEquals((float) Math.pow(2, -14), Safetensors.halfToFloat((short) 0x0400), 0f);
        assertEquals((float) Math.pow(2, -24), Safetensors.halfToFloat((short) 0x0001), 0f);
        assertEquals((float) (1023 * Math.pow(2, -24)), Safetensors.halfToFloat((short) 0x03FF), 0f);
        assertEquals(Float.floatToIntBits(-0f), Float.floatToIntBits(Safetensors.halfToFloat((short) 0x8000)));
        assertEquals(Float.POSITIVE_INFINITY, Safetensors.halfToFloat((short) 0x7C00), 0f);
        assertTrue(Float.isNaN(Safetensors.halfToFloat((short) 0x7E00)));
    }

    private File safetensors(String name, String header, int dataBytes) throws Exception {
        byte[] h = header.getBytes("UTF-8");
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        out.write(ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(h.length).array());
        out.write(h);
        out.write(new byte[dataBytes]);
        File f = new File(tmp.getRoot(), name);
        TestData.write(f, out.toByteArray());
        return f;
    }

    private static String refused(File f) {
        return TestData.refusal(() -> Safetensors.read(f));
    }

    @Test
    public void malformedSafetensorsAreRefusedNamingFileAndTensor() throws Exception {
        File f = new File(tmp.getRoot(), "short.safetensors");
        TestData.write(f, new byte[5]);
        assertContains(refused(f), "short.safetensors: not a safetensors file (5 bytes)");
        f = safetensors("long.safetensors", "{}", 0);
        byte[] data = Files.readAllBytes(f.toPath());
        data[6] = 1;  // header length 2^48
        TestData.write(f, data);
        assertContains(refused(f), "long.safetensors: not a safetensors file (header length");
        assertContains(refused(safetensors("json.safetensors", "{\"a\": ", 0)), "json.safetensors: not a safetensors file (JSON");
        assertContains(refused(safetensors("array.safetensors", "[1, 2]", 0)), "header is not an object");
        String entry = "{\"__metadata__\": {\"k\": \"v\"}, \"0.A.w\": {\"dtype\": \"F16\", \"shape\": [2, 3], \"data_offsets\": [0, %d]}}";
        assertEquals(1, Safetensors.read(safetensors("ok.safetensors", String.format(entry, 12), 12)).size());
        String msg = refused(safetensors("outside.safetensors", String.format(entry, 12), 11));
        assertContains(msg, "outside.safetensors: tensor '0.A.w': its bytes [0, 12)");
        assertContains(refused(safetensors("size.safetensors", String.format(entry, 10), 12)), "tensor '0.A.w': its bytes [0, 10) do not match its shape [2, 3] of F16");
        assertContains(refused(safetensors("dtype.safetensors", String.format(entry, 12).replace("F16", "F64"), 24)),
            "dtype.safetensors: tensor '0.A.w': dtype F64 is not one of");
        assertContains(refused(safetensors("shape.safetensors", String.format(entry, 12).replace("[2, 3]", "[2, -3]"), 12)),
            "tensor '0.A.w': malformed header entry (shape");
        assertContains(refused(safetensors("entry.safetensors", "{\"x\": 3}", 0)), "entry.safetensors: tensor 'x': malformed header entry");
    }

    @Test
    public void aBankFileThatDoesNotMatchTheLayoutsIsRefusedNamingTheFile() throws Exception {
        ExportManifest m = ExportManifest.read(export);
        BankSlots bank = new BankSlots(m.tasks, m.plan);
        long n = Safetensors.read(new File(export, "bank/shared.safetensors")).get("data").shape[0];
        // one byte short: a header and a file that agree with each other, not with the layouts
        String blob = "{\"__metadata__\":{\"hydraopt_bundle\":\"3\"},\"data\":{\"dtype\":\"U8\",\"shape\":[%d],\"data_offsets\":[0,%d]}}";
        File cut = safetensors("cut.safetensors", String.format(blob, n - 1, n - 1), (int) n - 1);
        assertContains(TestData.refusal(() -> bank.loadShared(cut)), "cut.safetensors: tensor 'data' holds " + (n - 1) + " bytes; the bank's layouts need " + n);
        // a task's file given as the shared file: the shared factors are not what it holds
        assertContains(TestData.refusal(() -> bank.loadShared(new File(export, "bank/tasks/alpha.safetensors"))), "alpha.safetensors: tensor 'data' holds ");
        // a file of bundle format 2 (a header entry per part)
        File old = safetensors("v2.safetensors", "{\"__metadata__\":{\"hydraopt_bundle\":\"2\"},\"0.A0.w\":{\"dtype\":\"F16\",\"shape\":[2,3],\"data_offsets\":[0,12]}}", 12);
        assertContains(TestData.refusal(() -> bank.loadShared(old)), "v2.safetensors: not a bank file of bundle format 3");
    }
}
