package org.hydraopt.demo;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.util.Map;
import java.util.stream.Stream;

/** Inputs the Python side of the test prepares (tests/test_android.py), passed as system properties. */
final class TestData {
    private TestData() {}

    static File required(String property) {
        String v = System.getProperty(property);
        if (v == null) throw new AssertionError("system property " + property + " is not set: run these tests through tests/test_android.py");
        File f = new File(v);
        if (!f.exists()) throw new AssertionError(property + "=" + v + " does not exist");
        return f;
    }

    /** A fresh copy of a folder (tests change files in it). */
    static File copy(File src, File dst) throws IOException {
        final Path from = src.toPath(), to = dst.toPath();
        Stream<Path> walk = Files.walk(from);
        try {
            for (Path p : (Iterable<Path>) walk::iterator) {
                Path t = to.resolve(from.relativize(p).toString());
                if (Files.isDirectory(p)) Files.createDirectories(t);
                else Files.copy(p, t, StandardCopyOption.REPLACE_EXISTING);
            }
        } finally {
            walk.close();
        }
        return dst;
    }

    @SuppressWarnings("unchecked")
    static Map<String, Object> manifestJson(File export) throws IOException {
        return (Map<String, Object>) Json.parse(ExportManifest.readUtf8(new File(export, ExportManifest.MANIFEST)));
    }

    static void writeManifest(File export, Map<String, Object> m) throws IOException {
        write(new File(export, ExportManifest.MANIFEST), Json.write(m).getBytes("UTF-8"));
    }

    /** Something a test expects the app to refuse. */
    interface Action {
        void run() throws Exception;
    }

    /** The message of the {@link ExportException} that {@code a} throws; fails when it throws none. */
    static String refusal(Action a) {
        try {
            a.run();
        } catch (ExportException e) {
            return e.getMessage();
        } catch (Exception e) {
            throw new AssertionError("expected an ExportException, got " + e, e);
        }
        throw new AssertionError("accepted: expected a refusal");
    }

    static void assertContains(String message, String part) {
        if (message == null || !message.contains(part)) {
            throw new AssertionError("message \"" + message + "\" should say \"" + part + "\"");
        }
    }

    static void write(File f, byte[] data) throws IOException {
        OutputStream o = new FileOutputStream(f);
        try {
            o.write(data);
        } finally {
            o.close();
        }
    }
}
