"""The Spark Structured Streaming baseline of spendflow's end-to-end benchmark.

Reads the same Kafka topic(s) as the engine, from the earliest offset, parses the same JSON v1
records, and keeps per-user total/count and per-user-and-category total/count in one streaming
aggregation (`rollup(user_id, category)`, update output mode, `local[2]`). The harness
(`bench/src/e2e/spark.rs`) starts it, reads the lines it prints, and stops it with SIGTERM.

What it computes, and how that differs from spendflow (said in RESULTS.md too): Structured
Streaming has no retraction of an earlier row inside a plain aggregation, so this baseline sums
every `upsert` record it reads: a correction is counted a second time instead of replacing the
expense, a duplicate delivery is counted twice, and a delete is read but changes nothing.
spendflow keeps the latest record per `expense_id` and retracts the old value. Doing that in
Spark needs a stateful `applyInPandasWithState`/`transformWithState` over every live expense,
which would be slower still; the plain aggregation is the cheaper job and so the generous
baseline. It also computes fewer aggregates (no merchant, day or month cells, no last event
time) and its sink does no work beyond picking the two rows the harness watches, where spendflow
publishes its whole read model every epoch.

Lines printed on stdout (one per event, flushed; times are Unix epoch milliseconds):

    READY <ms>                          the query has started
    BATCH <id> <ms> <records>           a micro-batch is committed to the sink; <records> is
                                        the number of records read so far (all ops)
    MARK <count> <total_minor> <ms>     the marker user's per-user row changed in that batch
"""

import argparse
import glob
import os
import signal
import sys
import time


def now_ms():
    return int(time.time() * 1000)


def emit(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--brokers", required=True, help="Kafka bootstrap servers")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--topic", help="one topic (the keyed layout)")
    src.add_argument("--pattern", help="a topic regex (the per-user layout)")
    p.add_argument("--checkpoint", required=True, help="a fresh directory for Spark's state")
    p.add_argument("--jars", required=True, help="directory with the Kafka connector jars")
    p.add_argument("--marker-user", type=int, required=True, help="the user whose row to report")
    p.add_argument("--driver-memory", default="2g")
    args = p.parse_args()

    from pyspark.sql import SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    jars = ",".join(sorted(glob.glob(os.path.join(os.path.abspath(args.jars), "*.jar"))))
    if not jars:
        sys.exit(f"no jars in {args.jars}: run bench/spark/install.sh")
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("spendflow-bench-baseline")
        .config("spark.jars", jars)
        .config("spark.driver.memory", args.driver_memory)
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.sql.streaming.ui.enabled", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")

    schema = StructType(
        [
            StructField("expense_id", StringType()),
            StructField("user_id", LongType()),
            StructField("category", StringType()),
            StructField("amount_minor", LongType()),
            StructField("op", StringType()),
        ]
    )
    reader = (
        spark.readStream.format("kafka")
        .option("kafka.bootstrap.servers", args.brokers)
        .option("startingOffsets", "earliest")
        .option("failOnDataLoss", "false")
    )
    reader = reader.option("subscribe", args.topic) if args.topic else reader.option(
        "subscribePattern", args.pattern
    )
    records = reader.load().select(
        F.from_json(F.col("value").cast("string"), schema).alias("r")
    ).select("r.*")
    upsert = F.coalesce(F.col("op"), F.lit("upsert")) == "upsert"
    aggregates = records.rollup("user_id", "category").agg(
        F.sum(F.when(upsert, F.col("amount_minor")).otherwise(F.lit(0))).alias("total_minor"),
        F.sum(F.when(upsert, F.lit(1)).otherwise(F.lit(0))).alias("expense_count"),
        F.count(F.lit(1)).alias("records"),
        F.grouping_id().alias("level"),
    )

    marker = args.marker_user
    last_marker = [None]

    def sink(batch, batch_id):
        # level 0: (user, category); 1: (user); 3: everything. Only two rows leave the JVM.
        rows = batch.filter(
            (F.col("level") == 3) | ((F.col("level") == 1) & (F.col("user_id") == marker))
        ).collect()
        ms = now_ms()
        records_read = None
        for row in rows:
            if row["level"] == 3:
                records_read = row["records"]
            elif row["level"] == 1:
                value = (row["expense_count"], row["total_minor"])
                if value != last_marker[0]:
                    last_marker[0] = value
                    emit(f"MARK {value[0]} {value[1]} {ms}")
        if records_read is not None:
            emit(f"BATCH {batch_id} {ms} {records_read}")

    query = (
        aggregates.writeStream.outputMode("update")
        .foreachBatch(sink)
        .option("checkpointLocation", args.checkpoint)
        .trigger(processingTime="0 seconds")
        .start()
    )
    emit(f"READY {now_ms()}")

    def stop(*_):
        try:
            query.stop()
        finally:
            spark.stop()
            os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    query.awaitTermination()


if __name__ == "__main__":
    main()
