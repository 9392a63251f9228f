package org.hydraopt.demo;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import org.junit.Before;
import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/**
 * The manifest reader on a real ONNX export of a tiny model (made by {@code hydraopt}'s exporter in
 * tests/test_android.py): byte totals equal the files' sizes, and hostile or careless exports are refused
 * with a message that names the file and the reason.
 */
public class ExportManifestTest {
    @Rule public TemporaryFolder tmp = new TemporaryFolder();
    private File export;

    @Before
    public void copyExport() throws Exception {
        export = TestData.copy(TestData.required("hydraopt.export"), new File(tmp.getRoot(), "export"));
    }

    private static String refused(File folder) {
        try {
            ExportManifest.read(folder);
        } catch (ExportException e) {
            return e.getMessage();
        }
        fail("accepted " + folder);
        return null;
    }

    private static void assertContains(String message, String part) {
        assertTrue("message \"" + message + "\" should say \"" + part + "\"", message != null && message.contains(part));
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
        long program = new File(export, "model.onnx").length(), decoder = new File(export, "task_decoder.onnx").length();
        assertTrue(program > 0 && decoder > 0);
        assertEquals(program + decoder, m.residentBytes());
        long tasks = 0;
        for (String t : m.tasks) {
            long size = new File(export, "tasks/" + t + ".onnx_adapter").length();
            assertEquals(t, size, m.taskBytes(t));
            tasks += size;
        }
        assertEquals(tasks, m.allTasksBytes());
        assertEquals(program + decoder + tasks, m.deviceBytes());
        long all = 0;  // every file of the folder except the manifest itself
        List<File> stack = new ArrayList<File>(Arrays.asList(export.listFiles()));
        while (!stack.isEmpty()) {
            File f = stack.remove(stack.size() - 1);
            if (f.isDirectory()) stack.addAll(Arrays.asList(f.listFiles()));
            else if (!f.getName().equals(ExportManifest.MANIFEST)) all += f.length();
        }
        assertEquals(all, m.totalFileBytes());
    }

    @Test
    public void corruptedTaskFileIsRefusedBeforeLoading() throws Exception {
        File alpha = new File(export, "tasks/alpha.onnx_adapter");
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
            assertContains(e.getMessage(), "alpha.onnx_adapter");
        }
        m.verifiedTaskFile("beta", null);
    }

    @Test
    public void swappedTaskFileIsNamed() throws Exception {
        Files.copy(new File(export, "tasks/beta.onnx_adapter").toPath(), new File(export, "tasks/alpha.onnx_adapter").toPath(),
            java.nio.file.StandardCopyOption.REPLACE_EXISTING);
        ExportManifest m = ExportManifest.read(export);
        try {
            m.verifiedTaskFile("alpha", null);
            fail("beta's file was accepted as alpha's");
        } catch (ExportException e) {
            assertContains(e.getMessage(), "this export's file for 'beta'");
        }
    }

    @Test
    public void taskFileOfAnotherExportIsRefused() throws Exception {
        File foreign = new File(TestData.required("hydraopt.foreign_export"), "tasks/alpha.onnx_adapter");
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
        File alpha = new File(export, "tasks/alpha.onnx_adapter");
        byte[] data = Files.readAllBytes(alpha.toPath());
        TestData.write(alpha, Arrays.copyOf(data, data.length - 10));
        String msg = refused(export);
        assertContains(msg, "truncated or belongs to another export");
        assertContains(msg, "alpha.onnx_adapter");
    }

    @Test
    public void missingFileIsRefused() throws Exception {
        assertTrue(new File(export, "task_decoder.onnx").delete());
        assertContains(refused(export), "task_decoder.onnx: missing");
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
        assertContains(refusedWith("tasks/alpha.onnx_adapter", "path", "../alpha.onnx_adapter"), "leaves the export folder");
        copyExport();
        assertContains(refusedWith("tasks/alpha.onnx_adapter", "path", "/etc/passwd"), "not a plain relative path");
        copyExport();
        assertContains(refusedWith("tasks/alpha.onnx_adapter", "path", "tasks//alpha.onnx_adapter"), "empty parts");
        copyExport();
        assertContains(refusedWith("tasks/alpha.onnx_adapter", "path", "tasks\\alpha.onnx_adapter"), "not a plain relative path");
    }

    @Test
    public void symlinkOutOfTheExportIsRefused() throws Exception {
        File outside = new File(tmp.getRoot(), "outside.bin");
        File alpha = new File(export, "tasks/alpha.onnx_adapter");
        Files.copy(alpha.toPath(), outside.toPath());
        assertTrue(alpha.delete());
        Files.createSymbolicLink(alpha.toPath(), outside.toPath());
        assertContains(refused(export), "outside the export folder");
    }

    @Test
    public void schemaRuntimeAndTypesAreChecked() throws Exception {
        assertContains(refusedWith(null, "schema", "hydraopt-export/0"), "not a hydraopt-export/1 manifest");
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
        assertContains(refusedWith("tasks/gamma.onnx_adapter", "task", "delta"), "not a task of this export");
        copyExport();
        TestData.write(new File(export, ExportManifest.MANIFEST), "{\"schema\": \"hydraopt-export/1\",".getBytes("UTF-8"));
        assertContains(refused(export), "JSON");
        assertTrue(new File(export, ExportManifest.MANIFEST).delete());
        assertContains(refused(export), "not an export folder");
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
