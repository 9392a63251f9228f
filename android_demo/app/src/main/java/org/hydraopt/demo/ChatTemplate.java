package org.hydraopt.demo;

/**
 * SmolLM2's chat template (the export's {@code tokenizer/chat_template.jinja}), written out in Java:
 * {@code <|im_start|>role\ncontent<|im_end|>\n} per message, SmolLM2's default system message when the
 * first message is not a system one, and {@code <|im_start|>assistant\n} to open the answer.
 * {@link #check} refuses an export whose template is another one, instead of prompting it wrongly.
 */
public final class ChatTemplate {
    public static final String DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    /** The template text this class implements (the export's file must equal it, modulo a final newline). */
    public static final String SMOLLM2_JINJA =
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        + "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    private ChatTemplate() {}

    public static void check(String jinja) throws ExportException {
        if (!jinja.trim().equals(SMOLLM2_JINJA.trim())) {
            throw new ExportException("chat_template.jinja is not SmolLM2's template; this app implements only that one");
        }
    }

    /** The prompt for one user turn, with an optional system message, and the assistant turn opened. */
    public static String render(String system, String user) {
        StringBuilder b = new StringBuilder();
        b.append("<|im_start|>system\n").append(system != null ? system : DEFAULT_SYSTEM).append("<|im_end|>\n");
        b.append("<|im_start|>user\n").append(user).append("<|im_end|>\n");
        b.append("<|im_start|>assistant\n");
        return b.toString();
    }
}
