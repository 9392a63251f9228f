package org.hydraopt.demo;

import java.io.IOException;

/** An export folder, manifest or file that the app refuses; the message names the file and the rule. */
public class ExportException extends IOException {
    public ExportException(String message) {
        super(message);
    }
}
