// Loads ONNX Runtime's Java API on the host JVM (java -cp ORT_CLASSES HostLoad.java): shows which native
// library is missing there. Used by tests/test_android.py and the README's "host JVM" command.
public class HostLoad {
    public static void main(String[] args) throws Exception {
        System.out.println("ONNX Runtime " + ai.onnxruntime.OrtEnvironment.getEnvironment().getVersion() + " loaded on the host JVM");
    }
}
