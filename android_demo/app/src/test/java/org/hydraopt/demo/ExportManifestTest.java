package org.hydraopt.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.hydraopt.demo.TestData.assertContains;
import static org.junit.Assert.fail;

import java.io.File;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import org.junit.Test;

/**
 * The manifest reader on a real ONNX export of a tiny model (made by {@code hydraopt}'s exporter in
 * tests/test_android.py): byte totals equal the files' sizes, and hostile or careless exports are refused
 * with a message that names the file and the reason.
 */
public class ExportManifestTest extends ExportCopy {

    private static String refused(File folder) {
        return TestData.refusal(() -> ExportManifest.read(folder));
    }

    @Test
    public void readsTheRealExportAndEveryChecksumMatches() throws Exception {
        ExportManifest m = ExportManifest.read(export);
        String tasks = System.getProperty("hydraopt.tasks");
        assertEquals(Arrays.asList(tasks.split(",")), m.tasks);
        assertEquals(ExportManifest.RUNTIME, "onnxruntime");
        m.verifyAll();
        assertTrue(m.nLayers > 0 && m.kvHeads > 0 && m.headDim > 0);
    }

    @Test
    public void byteTotalsEqualTheFileSizes() throws Exception {
        ExportManifest m = ExportManifest.read(export);
        long program = new File(export, "model.onnx").length(), shared = new File(export, "bank/shared.safetensors").length();
        assertTrue(program > 0 && shared > 0);
        assertEquals(program + shared, m.residentBytes());
        long tasks = 0;
        for (String t : m.tasks) {
            long size = new File(export, "bank/tasks/" + t + ".safetensors").length();
            assertEquals(t, size, m.taskBytes(t));
            tasks += size;
        }
        assertEquals(tasks, m.allTasksBytes());
        assertEquals(program + shared + tasks, m.deviceBytes());
        long all = 0;  // every file of the folder except the manifest itself
        List<File> stack = new ArrayList<File>(Arrays.asList(export.listFiles()));
        while (!stack.isEmpty()) {
            File f = stack.remove(stack.size() - 1);
            if (f.isDirectory()) stack.addAll(Arrays.asList(f.listFiles()));
            else if (!f.equals(new File(export, ExportManifest.MANIFEST))) all += f.length();
        }
        assertEquals(all, m.totalFileBytes());
    }

    @Test
    public void oneAdapterPerTaskBytesComeFromTheCheckedBundleManifest() throws Exception {
        assertEquals(null, ExportManifest.read(export).oneAdapterPerTaskBytes());  // the test bank records none
        File bank = new File(export, "bank/manifest.json");
        Map<String, Object> b = ExportManifest.jsonObject(bank);
        b.put("reference_file_bytes", 123456L);
        TestData.write(bank, Json.write(b).getBytes("UTF-8"));
        assertContains(refused(export), "bank/manifest.json: " + bank.length() + " bytes, but export");
        Map<String, Object> m = TestData.manifestJson(export);  // listed with its new size and checksum
        file(m, "bank/manifest.json").put("bytes", bank.length());
        file(m, "bank/manifest.json").put("sha256", ExportManifest.sha256(bank));
        TestData.writeManifest(export, m);
        assertEquals(Long.valueOf(123456L), ExportManifest.read(export).oneAdapterPerTaskBytes());
        b.put("reference_file_bytes", 654321L);  // same length, other bytes: the checksum refuses it
        TestData.write(bank, Json.write(b).getBytes("UTF-8"));
        try {
            ExportManifest.read(export).oneAdapterPerTaskBytes();
            fail("a changed bundle manifest was read");
        } catch (ExportException e) {
            assertContains(e.getMessage(), "SHA-256");
        }
    }

    @Test
    public void corruptedTaskFileIsRefusedBeforeLoading() throws Exception {
        File alpha = new File(export, "bank/tasks/alpha.safetensors");
        byte[] data = Files.readAllBytes(alpha.toPath());
        data[data.length - 3] ^= 1;
        TestData.write(alpha, data);
        ExportManifest m = ExportManifest.read(export);  // same size: read() passes, the checksum refuses it
        try {
            m.verifiedTaskFile("alpha", null);
            fail("a corrupted task file was accepted");
        } catch (ExportException e) {
            assertContains(e.getMessage(), "SHA-256");
            assertContains(e.getMessage(), "from another export, or corrupted");
            assertContains(e.getMessage(), "alpha.safetensors");
        }
        m.verifiedTaskFile("beta", null);
    }

    @Test
    public void swappedTaskFileIsNamed() throws Exception {
        // gamma's file has alpha's layout and size: only its checksum tells them apart
        Files.copy(new File(export, "bank/tasks/gamma.safetensors").toPath(), new File(export, "bank/tasks/alpha.safetensors").toPath(),
            java.nio.file.StandardCopyOption.REPLACE_EXISTING);
        ExportManifest m = ExportManifest.read(export);
        try {
            m.verifiedTaskFile("alpha", null);
            fail("beta's file was accepted as alpha's");
        } catch (ExportException e) {
            assertContains(e.getMessage(), "this export's file for 'gamma'");
        }
    }

    @Test
    public void taskFileOfAnotherExportIsRefused() throws Exception {
        File foreign = new File(TestData.required("hydraopt.foreign_export"), "bank/tasks/alpha.safetensors");
        ExportManifest m = ExportManifest.read(export);
        try {
            m.verifiedTaskFile("alpha", foreign);
            fail("another export's task file was accepted");
        } catch (ExportException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("another export"));
        }
    }

    @Test
    public void truncatedFileIsRefusedOnRead() throws Exception {
        File alpha = new File(export, "bank/tasks/alpha.safetensors");
        byte[] data = Files.readAllBytes(alpha.toPath());
        TestData.write(alpha, Arrays.copyOf(data, data.length - 10));
        String msg = refused(export);
        assertContains(msg, "truncated or belongs to another export");
        assertContains(msg, "alpha.safetensors");
    }

    @Test
    public void missingFileIsRefused() throws Exception {
        assertTrue(new File(export, "bank/shared.safetensors").delete());
        assertContains(refused(export), "shared.safetensors: missing");
    }

    @SuppressWarnings("unchecked")
    private Map<String, Object> file(Map<String, Object> m, String path) {
        for (Object o : (List<Object>) m.get("files")) {
            Map<String, Object> f = (Map<String, Object>) o;
            if (f.get("path").equals(path)) return f;
        }
        throw new AssertionError(path + " not in the manifest");
    }

    private String refusedWith(String path, String field, Object value) throws Exception {
        Map<String, Object> m = TestData.manifestJson(export);
        if (path == null) m.put(field, value);
        else file(m, path).put(field, value);
        TestData.writeManifest(export, m);
        return refused(export);
    }

    @Test
    public void pathsMustStayInsideTheExport() throws Exception {
        assertContains(refusedWith("bank/tasks/alpha.safetensors", "path", "../alpha.onnx_adapter"), "leaves the export folder");
        copyExport();
        assertContains(refusedWith("bank/tasks/alpha.safetensors", "path", "/etc/passwd"), "not a plain relative path");
        copyExport();
        assertContains(refusedWith("bank/tasks/alpha.safetensors", "path", "tasks//alpha.onnx_adapter"), "empty parts");
        copyExport();
        assertContains(refusedWith("bank/tasks/alpha.safetensors", "path", "tasks\\alpha.onnx_adapter"), "not a plain relative path");
    }

    @Test
    public void symlinkOutOfTheExportIsRefused() throws Exception {
        File outside = new File(tmp.getRoot(), "outside.bin");
        File alpha = new File(export, "bank/tasks/alpha.safetensors");
        Files.copy(alpha.toPath(), outside.toPath());
        assertTrue(alpha.delete());
        Files.createSymbolicLink(alpha.toPath(), outside.toPath());
        assertContains(refused(export), "outside the export folder");
    }

    @Test
    public void schemaRuntimeAndTypesAreChecked() throws Exception {
        assertContains(refusedWith(null, "schema", "hydraopt-export/1"), "not a hydraopt-export/4 manifest");
        copyExport();
        assertContains(refusedWith(null, "runtime", "executorch"), "this app runs onnxruntime");
        copyExport();
        assertContains(refusedWith("model.onnx", "bytes", "12"), "'bytes' must be an integer");
        copyExport();
        assertContains(refusedWith("model.onnx", "sha256", "abc"), "not 64 hex digits");
        copyExport();
        assertContains(refusedWith("model.onnx", "role", "payload"), "unknown role");
        copyExport();
        assertContains(refusedWith(null, "tasks", Arrays.asList((Object) "alpha", "../beta")), "not a plain name");
        copyExport();
        assertContains(refusedWith("bank/tasks/gamma.safetensors", "task", "delta"), "not a task of this export");
        copyExport();
        TestData.write(new File(export, ExportManifest.MANIFEST), "{\"schema\": \"hydraopt-export/4\",".getBytes("UTF-8"));
        assertContains(refused(export), "JSON");
        assertTrue(new File(export, ExportManifest.MANIFEST).delete());
        assertContains(refused(export), "not an export folder");
    }

    @Test
    @SuppressWarnings("unchecked")
    public void fileRolesFitTheTaskList() throws Exception {
        assertContains(refusedWith("bank/manifest.json", "role", "shared"), "two shared files");
        copyExport();
        assertContains(refusedWith("bank/tasks/beta.safetensors", "task", "alpha"), "two task files for alpha");
        copyExport();
        assertContains(refusedWith("bank/shared.safetensors", "task", "alpha"), "a shared file names task alpha");
        copyExport();
        Map<String, Object> m = TestData.manifestJson(export);
        ((Map<String, Object>) m.get("task_files")).put("alpha", Arrays.asList((Object) "bank/tasks/delta.safetensors"));
        TestData.writeManifest(export, m);
        assertContains(refused(export), "task_files of alpha names bank/tasks/delta.safetensors, not a file of this export");
    }

    @Test
    @SuppressWarnings("unchecked")
    public void slotsMustFitTheBank() throws Exception {
        // the program's slot of rank 4 cannot hold a bank factor of rank 4 + 1: refused, naming the module
        Map<String, Object> m = TestData.manifestJson(export);
        List<Object> slot = (List<Object>) ((List<Object>) m.get("slots")).get(0);
        String module = ((String) slot.get(0)).replace(".lora_a", "");
        List<Object> shape = (List<Object>) slot.get(1);
        shape.set(0, (Long) shape.get(0) - 1);
        TestData.writeManifest(export, m);
        String msg = refused(export);
        assertContains(msg, "module " + module + ": the bank's rank");
        assertContains(msg, "exceeds the program's slot rank");
        copyExport();
        m = TestData.manifestJson(export);
        ((List<Object>) m.get("slots")).remove(1);  // the first module's lora_b
        TestData.writeManifest(export, m);
        assertContains(refused(export), "module " + module + " has no slot lora_b in the program");
        // a module slot's block of a stacked q/k/v input must lie inside that input
        copyExport();
        m = TestData.manifestJson(export);
        List<Object> placed = (List<Object>) ((List<Object>) m.get("placement")).get(1);
        placed.set(3, 1000L);  // its first row past the stacked input's last
        TestData.writeManifest(export, m);
        assertContains(refused(export), "placement of " + placed.get(0) + ": not a block inside the program input " + placed.get(2));
        assertContains(refusedWithLayout("format", "int3"), "bank layout 0: format int3 is not fp16, int8 or int4-g{32,64,128}");
        assertContains(refusedWithLayout("a_index", Arrays.asList((Object) 0L, 0L)), "bank layout 0 a_index indexes 2 tasks, not 3");
        assertContains(refusedWithLayout("b_index", Arrays.asList((Object) 0L, 1L, 7L)), "bank layout 0 b_index names factor 7 of 3");
    }

    /** The refusal of a fresh copy of the export whose first bank layout has {@code field} set to {@code value}. */
    @SuppressWarnings("unchecked")
    private String refusedWithLayout(String field, Object value) throws Exception {
        copyExport();
        Map<String, Object> m = TestData.manifestJson(export);
        ((Map<String, Object>) ((List<Object>) ((Map<String, Object>) m.get("bank")).get("layouts")).get(0)).put(field, value);
        TestData.writeManifest(export, m);
        return refused(export);
    }

    @Test
    public void unknownTaskIsAClearError() throws Exception {
        ExportManifest m = ExportManifest.read(export);
        try {
            m.taskEntry("delta");
            fail("unknown task accepted");
        } catch (ExportException e) {
            assertContains(e.getMessage(), "task 'delta' is not in export");
            assertContains(e.getMessage(), "alpha, beta, gamma");
        }
    }
}
