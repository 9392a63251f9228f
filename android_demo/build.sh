#!/usr/bin/env bash
# Build the demo app as a signed debug APK without Gradle or Maven (see README.md).
#
#   android_demo/build.sh [--export DIR | --no-export] [--out DIR]
#       default export: $HYDRAOPT_ANDROID_EXPORT, else the demo bank's ONNX int4 export in the cache
#       (benchmarks/android_apk.py makes it); default --out: android_demo/build/
#   android_demo/build.sh tools          only fetch and prepare the tools (cached)
#   android_demo/build.sh adb ARGS...    Debian's adb from the same cache
#   android_demo/build.sh junit [-D...]  build and run the plain-Java JUnit tests on the host JVM
#   android_demo/build.sh junit-runtime [-D...]  the runtime tests (*HostTest) on ONNX Runtime's Java API
#                                        built for the host (see host_ort below)
#   android_demo/build.sh host-answer EXPORT TASK PROMPT [MAX_NEW [SYSTEM]]  the app's answer path on the host JVM
#
# Tools come from Debian packages (bookworm: aapt2, zipalign, apksigner, dexdump, junit4, adb;
# bullseye: android.jar API 23 and dx), fetched with private apt trees so the system's apt is not
# touched, and ONNX Runtime's Android AAR from npm (com.github.asus4.onnxruntime@0.4.9, ORT 1.29).
# Everything downloaded or derived is cached under ${HYDRAOPT_CACHE:-~/.cache/hydraopt-mobile}/android.
# The APK carries the JNI libraries of that same AAR (arm64-v8a, x86_64) and, unless --no-export,
# an export under assets/export/.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${HYDRAOPT_CACHE:-$HOME/.cache/hydraopt-mobile}/android"
ORT_NPM="com.github.asus4.onnxruntime@0.4.9"
ORT_VERSION="1.29"
DEBS_NEW="aapt zipalign apksigner dexdump junit4 adb"   # Debian 12
DEBS_OLD="libandroid-23-java dalvik-exchange"           # Debian 11 only
MIN_SDK=24                                              # the AAR's minSdkVersion
ABIS="arm64-v8a x86_64"
PKG=org.hydraopt.demo

log() { printf '[android] %s\n' "$*" >&2; }
die() { printf '[android] error: %s\n' "$*" >&2; exit 1; }

# --- Debian packages through a private apt tree -------------------------------------------------
apt_tree() {  # apt_tree NAME SUITE [TYPES]: print the apt options of a private tree for SUITE
    local t="$CACHE/apt/$1"
    mkdir -p "$t/etc/apt/sources.list.d" "$t/etc/apt/preferences.d" "$t/lists/partial" "$t/cache/archives/partial"
    cat > "$t/etc/apt/sources.list.d/debian.sources" <<EOF
Types: ${3:-deb}
URIs: http://deb.debian.org/debian
Suites: $2
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    local status=/var/lib/dpkg/status
    [ "$1" != new ] && { : > "$t/status"; status="$t/status"; }
    echo "-o Dir::Etc=$t/etc/apt -o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts=$t/etc/apt/sources.list.d" \
         "-o Dir::State=$t -o Dir::State::Lists=$t/lists -o Dir::State::status=$status -o Dir::Cache=$t/cache" \
         "-o Debug::NoLocking=1 -o APT::Sandbox::User=$(id -un)"
}

fetch_debs() {
    local root="$CACHE/root" stamp="$CACHE/root/.debs-$(echo "$DEBS_NEW $DEBS_OLD" | md5sum | cut -c1-12)"
    [ -f "$stamp" ] && return
    command -v apt-get >/dev/null || die "apt-get not found: the tools come from Debian packages"
    local new old
    new=$(apt_tree new bookworm); old=$(apt_tree old bullseye)
    log "fetching Debian packages: $DEBS_NEW (bookworm, with missing dependencies), $DEBS_OLD (bullseye)"
    # shellcheck disable=SC2086
    apt-get -q $new update >/dev/null
    # shellcheck disable=SC2086
    apt-get -q -y $new install --download-only --no-install-recommends $DEBS_NEW >/dev/null
    # shellcheck disable=SC2086
    apt-get -q $old update >/dev/null
    # shellcheck disable=SC2086
    (cd "$CACHE/apt/old/cache/archives" && apt-get -q $old download $DEBS_OLD >/dev/null)
    rm -rf "$root"; mkdir -p "$root"
    for deb in "$CACHE"/apt/new/cache/archives/*.deb "$CACHE"/apt/old/cache/archives/*.deb; do
        dpkg-deb -x "$deb" "$root"
    done
    touch "$stamp"
}

# tool paths inside the unpacked root; Debian's android libraries live in a private lib folder
setup_tools() {
    fetch_debs
    local r="$CACHE/root"
    export LD_LIBRARY_PATH="$r/usr/lib/x86_64-linux-gnu/android:$r/usr/lib/x86_64-linux-gnu:$r/usr/lib/p7zip:$r/usr/lib:$r/usr/lib/android-sdk/platform-tools/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    local bt="$r/usr/lib/android-sdk/build-tools/debian"
    ANDROID_JAR="$r/usr/lib/android-sdk/platforms/android-23/android.jar"
    AAPT2="$bt/aapt2"; ZIPALIGN="$bt/zipalign"; DEXDUMP="$bt/dexdump"
    ADB="$r/usr/lib/android-sdk/platform-tools/adb"
    DX_JAR="$r/usr/share/java/com.android.dx.jar"
    APKSIG_JAR="$r/usr/share/java/apksig.jar"
    APKSIGNER_JAR="$r/usr/share/java/apksigner.jar"
    JUNIT_CP="$r/usr/share/java/junit4.jar:$r/usr/share/java/hamcrest-core.jar:$r/usr/share/java/hamcrest.jar"
    for f in "$ANDROID_JAR" "$AAPT2" "$ZIPALIGN" "$DX_JAR" "$APKSIG_JAR" "$APKSIGNER_JAR" "$DEXDUMP"; do
        [ -e "$f" ] || die "missing after unpacking the Debian packages: $f"
    done
}
dx() { java -Xmx1g -cp "$DX_JAR" com.android.dx.command.Main "$@"; }
apksigner() { java -cp "$APKSIGNER_JAR:$APKSIG_JAR" com.android.apksigner.ApkSignerTool "$@"; }

# --- ONNX Runtime's Android AAR from npm, retargeted for dx ----------------------------------------
fetch_ort() {
    local dir="$CACHE/ort-$ORT_VERSION" tgz
    ORT_DIR="$dir"
    [ -f "$dir/.done" ] && return
    command -v npm >/dev/null || die "npm not found: ONNX Runtime's Android AAR comes from the npm registry"
    mkdir -p "$CACHE/npm"
    tgz="$CACHE/npm/com.github.asus4.onnxruntime-0.4.9.tgz"
    if [ ! -f "$tgz" ]; then
        log "fetching $ORT_NPM from npm (150 MB, once)"
        (cd "$CACHE/npm" && npm pack --silent "$ORT_NPM" >/dev/null)
    fi
    rm -rf "$dir.tmp"; mkdir -p "$dir.tmp/aar"
    tar xzf "$tgz" -C "$dir.tmp" package/Plugins/Android/onnxruntime.aar
    (cd "$dir.tmp/aar" && unzip -q ../package/Plugins/Android/onnxruntime.aar)
    rm -rf "$dir.tmp/package"
    rm -rf "$dir"; mv "$dir.tmp" "$dir"; touch "$dir/.done"
}

retarget_ort() {  # ORT_JAR: the AAR's classes at class version 52, lambdas desugared
    local out="$CACHE/ort-$ORT_VERSION/retargeted" key
    key=$(cat "$HERE/tools/retarget_classes.py" "$ORT_DIR/aar/classes.jar" | md5sum | cut -c1-12)
    ORT_JAR="$out/ort-classes-$key.jar"
    [ -f "$ORT_JAR" ] && return
    log "retargeting ONNX Runtime's Java 17 classes to Java 8 for dx"
    rm -rf "$out"; mkdir -p "$out/in" "$out/classes" "$out/src"
    (cd "$out/in" && unzip -q "$ORT_DIR/aar/classes.jar")
    python3 "$HERE/tools/retarget_classes.py" "$out/in" "$out/classes" "$out/src" > "$out/retarget.log"
    # the generated lambda holders; java.util.function is not in android.jar 23, so the JDK's own
    javac -nowarn -source 8 -target 8 -Xlint:-options -cp "$out/classes" -d "$out/classes" $(find "$out/src" -name '*.java')
    (cd "$out/classes" && zip -qr "$ORT_JAR.tmp" .) && mv "$ORT_JAR.tmp" "$ORT_JAR"
}

tools() { setup_tools; fetch_ort; retarget_ort; }

# --- the app -----------------------------------------------------------------------------------
# The source set: exactly what the Gradle module compiles (app/src/main/java, res, manifest).
SRC="$HERE/app/src/main"
app_sources() { find "$SRC/java" -name '*.java' | LC_ALL=C sort; }

build_apk() {
    local export_dir="$1" out="$2" t0 build
    t0=$(date +%s.%N)
    tools
    build="$out/intermediates"  # per output folder: two builds at once do not share state
    rm -rf "$build"; mkdir -p "$build/res" "$build/classes" "$build/dex" "$build/apk"
    app_sources > "$build/sources.txt"
    log "compiling $(wc -l < "$build/sources.txt") Java sources against android.jar (API 23) and ONNX Runtime $ORT_VERSION"
    "$AAPT2" compile --dir "$SRC/res" -o "$build/res/res.zip"
    # what Gradle does with `namespace`: the package attribute of the merged manifest
    sed "s|<manifest |<manifest package=\"$PKG\" |" "$SRC/AndroidManifest.xml" > "$build/AndroidManifest.xml"
    "$AAPT2" link -I "$ANDROID_JAR" --manifest "$build/AndroidManifest.xml" --min-sdk-version $MIN_SDK \
        --target-sdk-version 23 --java "$build/gen" -o "$build/base.apk" "$build/res/res.zip"
    javac -nowarn -Xlint:-options -source 8 -target 8 -encoding UTF-8 -bootclasspath "$ANDROID_JAR" \
        -cp "$ORT_JAR" -d "$build/classes" @"$build/sources.txt" $(find "$build/gen" -name '*.java')
    (cd "$build/classes" && zip -qr ../app-classes.jar .)
    dx --dex --min-sdk-version=$MIN_SDK --output="$build/dex/classes.dex" "$build/app-classes.jar" "$ORT_JAR"
    cp "$build/base.apk" "$build/unaligned.apk"
    (cd "$build/dex" && zip -q "$build/unaligned.apk" classes.dex)
    for abi in $ABIS; do
        mkdir -p "$build/apk/lib/$abi"
        cp "$ORT_DIR/aar/jni/$abi/"*.so "$build/apk/lib/$abi/"
    done
    if [ -n "$export_dir" ]; then
        [ -f "$export_dir/manifest.json" ] || die "$export_dir: no manifest.json (not an export folder)"
        log "adding export $export_dir to assets/export/"
        mkdir -p "$build/apk/assets/export"
        cp -r "$export_dir"/. "$build/apk/assets/export/"
    fi
    # native libraries compressed (extractNativeLibs: installed once), export files stored as they are
    # (already dense; AssetManager streams them to the app's files folder on the first start)
    (cd "$build/apk" && zip -q -9 -r "$build/unaligned.apk" lib)
    if [ -d "$build/apk/assets" ]; then (cd "$build/apk" && zip -q -0 -r "$build/unaligned.apk" assets); fi
    "$ZIPALIGN" -f -p 4 "$build/unaligned.apk" "$build/aligned.apk"
    local ks="$CACHE/debug.keystore"
    if [ ! -f "$ks" ]; then
        keytool -genkeypair -keystore "$ks" -storepass android -keypass android -alias androiddebugkey \
            -keyalg RSA -keysize 2048 -validity 10000 -dname "CN=Android Debug,O=Android,C=US" >/dev/null 2>&1
    fi
    mkdir -p "$out"
    apksigner sign --ks "$ks" --ks-pass pass:android --key-pass pass:android --out "$out/hydraopt-demo.apk" "$build/aligned.apk"
    rm -f "$out/hydraopt-demo.apk.idsig"
    check_apk "$out/hydraopt-demo.apk" "$build"
    local bytes secs
    bytes=$(stat -c %s "$out/hydraopt-demo.apk")
    secs=$(echo "$(date +%s.%N) - $t0" | bc)
    printf '{"apk": "%s", "apk_bytes": %s, "build_seconds": %.1f, "export": "%s", "ort_version": "%s", "abis": "%s"}\n' \
        "$out/hydraopt-demo.apk" "$bytes" "$secs" "$export_dir" "$ORT_VERSION" "$ABIS" > "$out/build.json"
    log "APK: $out/hydraopt-demo.apk ($bytes bytes, $(numfmt --to=iec "$bytes")), built in ${secs%.*} s"
    echo "$out/hydraopt-demo.apk $bytes"
}

check_apk() {  # the checks of the issue: signature, activity, both ABIs' ORT library, app classes in the dex
    local apk="$1" build="$2" listing
    apksigner verify --verbose "$apk" | grep -q "Verified using v2 scheme (APK Signature Scheme v2): true" \
        || die "apksigner verify failed"
    "$AAPT2" dump badging "$apk" 2>/dev/null | grep -q "launchable-activity: name='$PKG.MainActivity'" \
        || die "$PKG.MainActivity is not the APK's launchable activity"
    listing=$(unzip -l "$apk")
    for abi in $ABIS; do
        grep -q "lib/$abi/libonnxruntime.so" <<< "$listing" || die "lib/$abi/libonnxruntime.so missing"
        grep -q "lib/$abi/libonnxruntime4j_jni.so" <<< "$listing" || die "lib/$abi/libonnxruntime4j_jni.so missing"
    done
    "$DEXDUMP" -f "$build/dex/classes.dex" > /dev/null
    "$DEXDUMP" "$build/dex/classes.dex" | grep "Class descriptor" | sed "s/.*'L\(.*\);'/\1/" | LC_ALL=C sort > "$build/dex-classes.txt"
    local missing=0
    while read -r src; do
        local cls="${src#"$SRC/java/"}"; cls="${cls%.java}"
        grep -qx "$cls" "$build/dex-classes.txt" || { log "class $cls not in the dex"; missing=1; }
    done < "$build/sources.txt"
    grep -qx "ai/onnxruntime/OrtLoraAdapter" "$build/dex-classes.txt" || missing=1
    [ $missing = 0 ] || die "the dex lacks classes"
    log "checks passed: apksigner verify (v2), MainActivity in the manifest, libonnxruntime.so for $ABIS, $(wc -l < "$build/dex-classes.txt") classes in the dex"
}

# --- ONNX Runtime's Java API on the host JVM (for the runtime tests) ----------------------------------
# The AAR's JNI glue is built for Android only, and no package ships it for linux-x64. Closest real
# thing from the registries: the Java API and JNI glue of ONNX Runtime 1.21.0 from Debian's source
# package (trixie, the archive's orig tarball, checked against the signed Sources index), compiled
# here, on top of the ONNX Runtime C library 1.30.0 for linux-x64 from npm onnxruntime-node. The app's
# own classes (compiled against the AAR's 1.29 API) run on it; only the Java API version differs.
HOST_ORT_SRC_VERSION="1.21.0+dfsg-1"
HOST_ORT_NODE="onnxruntime-node@1.30.0"
host_ort() {
    local d="$CACHE/host-ort" src orig sha tgz jdk
    HOST_ORT_JAR="$d/ort-java-1.21.0-host.jar"; HOST_ORT_LIB="$d/lib"
    [ -f "$d/.done" ] && return
    command -v gcc >/dev/null || die "gcc not found: the JNI glue is compiled here"
    src=$(apt_tree src trixie deb-src)
    log "fetching ONNX Runtime $HOST_ORT_SRC_VERSION sources from Debian (orig tarball, 38 MB) and $HOST_ORT_NODE from npm (113 MB)"
    # shellcheck disable=SC2086
    apt-get -q $src update >/dev/null
    mkdir -p "$CACHE/apt/src/dl"
    orig="onnxruntime_${HOST_ORT_SRC_VERSION%-*}.orig.tar.xz"
    # shellcheck disable=SC2086
    sha=$(apt-cache $src showsrc onnxruntime 2>/dev/null | sed -n '/^Checksums-Sha256:/,/^[A-Z]/p' | awk -v f="$orig" '$3 == f {print $1}' | head -1)
    [ -n "$sha" ] || die "onnxruntime $HOST_ORT_SRC_VERSION is not in Debian trixie's Sources index"
    if ! echo "$sha  $CACHE/apt/src/dl/$orig" | sha256sum -c --status 2>/dev/null; then
        # only the orig tarball is needed; the archive mirror here has served it without the .dsc,
        # so apt's status is not trusted: the file's SHA-256 is checked against the index instead
        # shellcheck disable=SC2086
        (cd "$CACHE/apt/src/dl" && apt-get -q $src source --download-only "onnxruntime=$HOST_ORT_SRC_VERSION" >/dev/null 2>&1 || true)
        echo "$sha  $CACHE/apt/src/dl/$orig" | sha256sum -c --status || die "$orig: download failed or SHA-256 differs from Debian's index"
    fi
    tgz="$CACHE/npm/onnxruntime-node-1.30.0.tgz"
    if [ ! -f "$tgz" ]; then (mkdir -p "$CACHE/npm" && cd "$CACHE/npm" && npm pack --silent "$HOST_ORT_NODE" >/dev/null); fi
    rm -rf "$d.tmp"; mkdir -p "$d.tmp/src" "$d.tmp/classes" "$d.tmp/hdr" "$d.tmp/cfg" "$d.tmp/lib"
    tar xJf "$CACHE/apt/src/dl/$orig" -C "$d.tmp/src" --strip-components=1 --wildcards \
        '*/java/src/main/java/*' '*/java/src/main/jvm/*' '*/java/src/main/native/*' '*/include/*' \
        '*/onnxruntime/core/providers/*.h' '*/cmake/onnxruntime_config.h.in'
    tar xzf "$tgz" -C "$d.tmp" package/bin/napi-v6/linux/x64/libonnxruntime.so.1
    mv "$d.tmp/package/bin/napi-v6/linux/x64/libonnxruntime.so.1" "$d.tmp/lib/"
    ln -s libonnxruntime.so.1 "$d.tmp/lib/libonnxruntime.so"
    (cd "$d.tmp/src" && javac -nowarn -encoding UTF-8 -h "$d.tmp/hdr" -d "$d.tmp/classes" \
        $(find java/src/main/java java/src/main/jvm -name '*.java'))
    sed -e 's|#cmakedefine ORT_VERSION .*|#define ORT_VERSION "1.21.0"|' -e 's|#cmakedefine \(.*\)|/* #undef \1 */|' \
        "$d.tmp/src/cmake/onnxruntime_config.h.in" > "$d.tmp/cfg/onnxruntime_config.h"
    jdk=$(dirname "$(dirname "$(readlink -f "$(command -v javac)")")")
    (cd "$d.tmp/src" && gcc -shared -fPIC -O2 -w -I"$jdk/include" -I"$jdk/include/linux" -I"$d.tmp/hdr" -I"$d.tmp/cfg" \
        -Iinclude -Iinclude/onnxruntime -Iinclude/onnxruntime/core/session -I. -Ionnxruntime -Iorttraining/orttraining/training_api/include \
        java/src/main/native/*.c \
        -o "$d.tmp/lib/libonnxruntime4j_jni.so" -L"$d.tmp/lib" -l:libonnxruntime.so.1 -Wl,-rpath,'$ORIGIN')
    (cd "$d.tmp/classes" && zip -qr "../$(basename "$HOST_ORT_JAR")" .)
    rm -rf "$d.tmp/src" "$d.tmp/classes" "$d.tmp/hdr" "$d.tmp/cfg" "$d.tmp/package"
    rm -rf "$d"; mv "$d.tmp" "$d"; touch "$d/.done"
}

# --- JUnit on the host JVM ---------------------------------------------------------------------
compile_for_host() {  # compile_for_host DIR: the app's plain-Java part (no android.* imports) and the tests into DIR/classes,
    # compiled against the app's ORT API (the AAR's 1.29)
    local b="$1"
    rm -rf "$b"; mkdir -p "$b/classes"
    grep -L '^import android\.' $(app_sources) > "$b/sources.txt"
    find "$HERE/app/src/test/java" -name '*.java' | LC_ALL=C sort >> "$b/sources.txt"
    javac -nowarn -encoding UTF-8 -cp "$JUNIT_CP:$ORT_JAR" -d "$b/classes" @"$b/sources.txt"
}

test_classes() {  # test_classes FIND_ARGS...: the test classes whose files match, as class names in name order
    (cd "$HERE/app/src/test/java" && find . "$@" | sed 's|^\./||; s|\.java$||; s|/|.|g' | LC_ALL=C sort)
}

junit() {  # junit [-Dname=value...] [TEST_CLASS...]: the app's plain-Java classes and the tests on JUnit 4
    setup_tools; fetch_ort; retarget_ort
    local b="$CACHE/junit" props=() classes=()
    while [ $# -gt 0 ] && [ "${1#-D}" != "$1" ]; do props+=("$1"); shift; done
    compile_for_host "$b"
    if [ $# -gt 0 ]; then classes=("$@"); else
        mapfile -t classes < <(test_classes -name '*Test.java' ! -name '*HostTest.java')
    fi
    java "${props[@]}" -cp "$b/classes:$JUNIT_CP:$ORT_JAR" org.junit.runner.JUnitCore "${classes[@]}"
}

junit_runtime_classes() {  # the app's plain-Java classes and the tests, for the runtime tests and host-answer
    setup_tools; fetch_ort; retarget_ort; host_ort
    compile_for_host "$CACHE/junit-runtime"
}

junit_runtime() {  # junit-runtime [-D...]: the *HostTest classes (the app's runtime code) on ONNX Runtime's Java API
    local b="$CACHE/junit-runtime" props=() classes=()
    while [ $# -gt 0 ] && [ "${1#-D}" != "$1" ]; do props+=("$1"); shift; done
    # compiled against the app's ORT API (the AAR's 1.29), run on the host build of the Java API
    junit_runtime_classes
    mapfile -t classes < <(test_classes -name '*HostTest.java')
    java "${props[@]}" -Donnxruntime.native.path="$HOST_ORT_LIB" -cp "$b/classes:$JUNIT_CP:$HOST_ORT_JAR" \
        org.junit.runner.JUnitCore "${classes[@]}"
}

main() {
    local export_dir="${HYDRAOPT_ANDROID_EXPORT:-}" out="$HERE/build" explicit=0
    case "${1:-}" in
        tools) tools; log "tools ready in $CACHE"; return ;;
        junit) shift; junit "$@"; return ;;
        junit-runtime) shift; junit_runtime "$@"; return ;;
        host-answer) shift; junit_runtime_classes
            exec java -Donnxruntime.native.path="$HOST_ORT_LIB" -cp "$CACHE/junit-runtime/classes:$HOST_ORT_JAR" \
                org.hydraopt.demo.HostAnswer "$@" ;;
        adb) shift; setup_tools; exec "$ADB" "$@" ;;
        host-ort) setup_tools; host_ort; log "host ONNX Runtime Java API in $CACHE/host-ort"; return ;;
    esac
    while [ $# -gt 0 ]; do
        case "$1" in
            --export) export_dir="$2"; explicit=1; shift 2 ;;
            --no-export) export_dir=""; explicit=1; shift ;;
            --out) out="$2"; shift 2 ;;
            *) die "unknown argument $1 (usage: build.sh [--export DIR | --no-export] [--out DIR] | tools | junit)" ;;
        esac
    done
    if [ $explicit = 0 ] && [ -z "$export_dir" ]; then
        # default: the demo bank's ONNX int4 export (HydraOpt at 1/T), as benchmarks/android_apk.py caches it
        export_dir=$(ls -dt "${HYDRAOPT_CACHE:-$HOME/.cache/hydraopt-mobile}"/exports/onnx-int4-hydraopt-*/ 2>/dev/null | head -1)
        export_dir="${export_dir%/}"
        [ -n "$export_dir" ] || die "no demo export in the cache: make it with 'python benchmarks/android_apk.py' (ONNX int4 export of the demo bank), or pass --export DIR or --no-export"
        log "default export: $export_dir"
    fi
    build_apk "$export_dir" "$out"
}
main "$@"
