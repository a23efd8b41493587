#!/usr/bin/env bash
# bench/kstreams/build.sh: builds the Kafka Streams baseline of the end-to-end benchmark into
# target/bench/kstreams (idempotent: a second run with unchanged sources only checks and returns).
#
#   bench/kstreams/build.sh         build if needed, print the Java classpath to use
#
# Maven resolves kafka-streams (the broker's version, pinned in pom.xml), jackson-databind and
# slf4j-nop from Maven Central, compiles the one class, and copies the jars into
# target/bench/kstreams/build/lib. Needs mvn and a Java 17 JDK, as the Spark baseline does.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DIR=${SPENDFLOW_KSTREAMS_DIR:-$REPO/target/bench/kstreams}
BUILD=$DIR/build

say() { printf '[kstreams-build] %s\n' "$*" >&2; }
die() { printf '[kstreams-build] error: %s\n' "$*" >&2; exit 1; }

# The sources' fingerprint: a rebuild when the pom or the program changes.
SUM=$(cat "$HERE/build.sh" "$HERE/pom.xml" "$HERE"/src/main/java/spendflow/bench/*.java | sha256sum | cut -c1-16)
STAMP=$DIR/built-$SUM
CLASSPATH_OUT="$BUILD/classes:$BUILD/lib/*"

if [[ -f $STAMP && -d $BUILD/classes && -d $BUILD/lib ]]; then
  echo "$CLASSPATH_OUT"
  exit 0
fi
for c in mvn java; do
  command -v "$c" >/dev/null 2>&1 || die "'$c' is required (maven and a Java 17 JDK)"
done
mkdir -p "$DIR"
rm -f "$DIR"/built-*
rm -rf "$BUILD/lib"   # no stale jars from an earlier version on the classpath
say "mvn package (kafka-streams from Maven Central on the first build; a minute or two)"
mvn -B -q -f "$HERE/pom.xml" -Dkstreams.out="$DIR" package >&2 \
  || die "mvn package failed for $HERE/pom.xml (see the Maven output above)"
[[ -f $BUILD/classes/spendflow/bench/KStreamsBaseline.class ]] \
  || die "the build left no KStreamsBaseline.class in $BUILD/classes"
ls "$BUILD"/lib/kafka-streams-*.jar >/dev/null 2>&1 || die "kafka-streams is missing from $BUILD/lib"
touch "$STAMP"
say "built: $(cd "$BUILD/lib" && ls kafka-streams-*.jar)"
echo "$CLASSPATH_OUT"
