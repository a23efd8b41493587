#!/usr/bin/env bash
# bench/spark/install.sh: installs the Spark Structured Streaming baseline of the end-to-end
# benchmark into target/bench/spark (idempotent; a second run only checks and returns).
#
#   bench/spark/install.sh            install if missing, print the python interpreter to use
#
# What it installs (nothing outside target/bench/spark):
#   * a Python venv with pyspark==$SPARK_VERSION from PyPI (the sdist bundles Spark's jars;
#     building its wheel takes a minute or two and about 1 GB of disk);
#   * the Kafka connector jars pyspark lacks, of exactly the same Spark version, from Maven
#     Central (bench/spark/pom.xml), copied into target/bench/spark/jars.
# Needs python3 (>= 3.10, with venv), mvn and a Java 17 JDK, as docker/native/services does.
set -euo pipefail

SPARK_VERSION=${SPARK_VERSION:-4.2.0}   # the pyspark and spark-sql-kafka-0-10_2.13 version

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DIR=${SPENDFLOW_SPARK_DIR:-$REPO/target/bench/spark}
VENV=$DIR/venv
JARS=$DIR/jars
STAMP=$DIR/installed-$SPARK_VERSION

say() { printf '[spark-install] %s\n' "$*" >&2; }
die() { printf '[spark-install] error: %s\n' "$*" >&2; exit 1; }

if [[ -f $STAMP && -x $VENV/bin/python ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

for c in python3 mvn java; do
  command -v "$c" >/dev/null 2>&1 || die "'$c' is required (python3 with venv, maven, a Java 17 JDK)"
done
mkdir -p "$DIR"

if [[ ! -x $VENV/bin/python ]]; then
  say "creating the venv $VENV"
  python3 -m venv "$VENV" || die "python3 -m venv failed (apt-get install python3-venv?)"
fi
if ! "$VENV/bin/python" -c "import pyspark, sys; sys.exit(pyspark.__version__ != '$SPARK_VERSION')" 2>/dev/null; then
  say "pip install pyspark==$SPARK_VERSION (a ~450 MB sdist with Spark's jars; a few minutes)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "pyspark==$SPARK_VERSION" \
    || die "pip install pyspark==$SPARK_VERSION failed"
fi

say "copying spark-sql-kafka-0-10_2.13:$SPARK_VERSION and its Kafka deps into $JARS"
rm -rf "$JARS.tmp"
mvn -B -q -f "$HERE/pom.xml" -Dspark.version="$SPARK_VERSION" \
  dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$JARS.tmp" \
  -DincludeArtifactIds=spark-sql-kafka-0-10_2.13,spark-token-provider-kafka-0-10_2.13,kafka-clients,commons-pool2 \
  >&2 || die "mvn could not resolve org.apache.spark:spark-sql-kafka-0-10_2.13:$SPARK_VERSION"
rm -rf "$JARS"
mv "$JARS.tmp" "$JARS"
ls "$JARS"/spark-sql-kafka-0-10_2.13-*.jar >/dev/null 2>&1 || die "the connector jar is missing from $JARS"

touch "$STAMP"
say "installed: $("$VENV/bin/python" -c 'import pyspark; print("pyspark", pyspark.__version__)'), jars: $(cd "$JARS" && ls | tr '\n' ' ')"
echo "$VENV/bin/python"
