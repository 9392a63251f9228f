package org.hydraopt.demo;

import java.io.File;
import org.junit.Before;
import org.junit.Rule;
import org.junit.rules.TemporaryFolder;

/** Tests that change files of the real export ({@code -Dhydraopt.export}) work on a fresh copy of it. */
abstract class ExportCopy {
    @Rule public TemporaryFolder tmp = new TemporaryFolder();
    protected File export;

    @Before
    public void copyExport() throws Exception {
        export = TestData.copy(TestData.required("hydraopt.export"), new File(tmp.getRoot(), "export"));
    }
}
