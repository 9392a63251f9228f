package org.hydraopt.demo;

import java.io.File;

/**
 * The app's answer path on the host JVM, without the UI: manifest, tokenizer, chat template, runner,
 * streamed greedy decoding, and the panel's timings. {@code build.sh host-answer EXPORT TASK PROMPT [MAX_NEW [SYSTEM]]}.
 */
public final class HostAnswer {
    public static void main(String[] args) throws Exception {
        ExportManifest m = ExportManifest.read(new File(args[0]));
        File tpl = m.chatTemplate() != null ? m.verified(m.chatTemplate()) : null;
        if (tpl != null) ChatTemplate.check(ExportManifest.readUtf8(tpl));
        BpeTokenizer tok = new BpeTokenizer(m.verified(m.tokenizerJson()));
        int maxNew = args.length > 3 ? Integer.parseInt(args[3]) : 32;
        OrtRunner runner = new OrtRunner(m, 1);
        try {
            runner.loadTask(args[1]);
            double sw = runner.setTask(args[1]);
            int[] ids = tok.encode(ChatTemplate.render(args.length > 4 ? args[4] : null, args[2]));
            final BpeTokenizer.Stream stream = tok.new Stream(true);
            OrtRunner.Generation g = runner.greedy(ids, maxNew, new OrtRunner.TokenListener() {
                public void onToken(int token) { System.out.print(stream.push(token)); System.out.flush(); }
            });
            System.out.println();
            System.out.printf("tokens %s%n", g.tokens);
            System.out.printf("session %.0f ms, task load %.1f ms, switch %.4f ms, prefill %.1f ms (%d tokens), decode %.1f ms/token%n",
                runner.sessionMs, runner.loadMs(args[1]), sw, g.prefillMs, ids.length, g.msPerToken());
            System.out.printf("resident %,d B, task %,d B, all tasks %,d B%n", m.residentBytes(), m.taskBytes(args[1]), m.allTasksBytes());
        } finally {
            runner.close();
        }
    }
}
