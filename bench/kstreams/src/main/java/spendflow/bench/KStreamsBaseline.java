package spendflow.bench;

import com.fasterxml.jackson.databind.DeserializationFeature;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.io.PrintWriter;
import java.nio.ByteBuffer;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.atomic.AtomicLong;
import java.util.regex.Pattern;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.common.serialization.Deserializer;
import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.serialization.Serializer;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.KStream;
import org.apache.kafka.streams.kstream.KTable;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * The Kafka Streams baseline of spendflow's end-to-end benchmark.
 *
 * <p>Reads the same topic(s) as the engine from the earliest offset and keeps, per user, the
 * total (minor units) and the count of live expenses, with upsert semantics as spendflow has
 * them: a KTable by expense identity {@code (user_id, expense_id)} holds the latest version of
 * each expense (a correction replaces it, a delete retracts it, a refund is a negative amount, a
 * duplicate changes nothing), re-aggregated per user with an adder and a subtractor, so an
 * earlier version is retracted. Exactly-once ({@code exactly_once_v2}), state in RocksDB (the
 * default store, with its changelog topics), {@code --threads} stream threads.
 *
 * <p>The per-expense value also counts the records that reached it, and the per-user aggregate
 * sums those counts: when the per-user results the program has received add up to N records,
 * every one of the N records has gone through both stages. That is how catch-up is detected
 * without timing guesses.
 *
 * <p>Lines printed on stdout (one per event, flushed; times are Unix epoch milliseconds):
 *
 * <pre>
 *   READY &lt;ms&gt;                          the topology is built and started
 *   BATCH 0 &lt;ms&gt; &lt;records&gt;             the per-user results received so far cover &lt;records&gt;
 *                                       records (rejected ones included)
 *   MARK &lt;count&gt; &lt;total_minor&gt; &lt;ms&gt;     the marker user's row changed
 * </pre>
 *
 * With {@code --totals FILE --expect N}, every user's {@code user total count} is written to FILE
 * (atomically) before the first BATCH line that reaches N.
 */
public final class KStreamsBaseline {
  /** The latest version of one expense; {@code n} counts the records that reached it. */
  record Exp(long user, long amount, boolean live, long n) {}

  /** One user's aggregate; {@code records} sums the {@code n} of its expenses. */
  record Agg(long total, long count, long records) {}

  /** The parts of a JSON v1 record this job reads (unknown fields are ignored). */
  public static final class Rec {
    public String expense_id;
    public Long user_id;
    public Long amount_minor;
    public String op;
  }

  static final ObjectMapper JSON =
      new ObjectMapper().configure(DeserializationFeature.FAIL_ON_UNKNOWN_PROPERTIES, false);

  static final Serde<Exp> EXP =
      Serdes.serdeFrom(
          (Serializer<Exp>)
              (topic, e) -> {
                if (e == null) return null;
                return ByteBuffer.allocate(25)
                    .putLong(e.user())
                    .putLong(e.amount())
                    .put((byte) (e.live() ? 1 : 0))
                    .putLong(e.n())
                    .array();
              },
          (Deserializer<Exp>)
              (topic, b) -> {
                if (b == null) return null;
                ByteBuffer buf = ByteBuffer.wrap(b);
                return new Exp(buf.getLong(), buf.getLong(), buf.get() != 0, buf.getLong());
              });

  static final Serde<Agg> AGG =
      Serdes.serdeFrom(
          (Serializer<Agg>)
              (topic, a) -> {
                if (a == null) return null;
                return ByteBuffer.allocate(24)
                    .putLong(a.total())
                    .putLong(a.count())
                    .putLong(a.records())
                    .array();
              },
          (Deserializer<Agg>)
              (topic, b) -> {
                if (b == null) return null;
                ByteBuffer buf = ByteBuffer.wrap(b);
                return new Agg(buf.getLong(), buf.getLong(), buf.getLong());
              });

  static final Map<Long, Agg> USERS = new ConcurrentHashMap<>();
  static final AtomicLong RECORDS = new AtomicLong();
  static final AtomicLong REJECTED = new AtomicLong();
  static final Object OUT = new Object();

  static void emit(String line) {
    synchronized (OUT) {
      System.out.println(line);
      System.out.flush();
    }
  }

  static String arg(String[] args, String name, String dflt) {
    for (int i = 0; i + 1 < args.length; i++) {
      if (args[i].equals(name)) return args[i + 1];
    }
    if (dflt == null) {
      System.err.println("kstreams-baseline: " + name + " is required");
      System.exit(2);
    }
    return dflt;
  }

  public static void main(String[] args) throws Exception {
    String brokers = arg(args, "--brokers", null);
    String topic = arg(args, "--topic", "");
    String pattern = arg(args, "--pattern", "");
    String appId = arg(args, "--app-id", null);
    String stateDir = arg(args, "--state-dir", null);
    long marker = Long.parseLong(arg(args, "--marker-user", null));
    int threads = Integer.parseInt(arg(args, "--threads", "2"));
    long expect = Long.parseLong(arg(args, "--expect", "-1"));
    String totals = arg(args, "--totals", "");
    if (topic.isEmpty() == pattern.isEmpty()) {
      System.err.println("kstreams-baseline: give exactly one of --topic and --pattern");
      System.exit(2);
    }

    StreamsBuilder builder = new StreamsBuilder();
    Consumed<byte[], byte[]> consumed = Consumed.with(Serdes.ByteArray(), Serdes.ByteArray());
    KStream<byte[], byte[]> source =
        topic.isEmpty()
            ? builder.stream(Pattern.compile(pattern), consumed)
            : builder.stream(topic, consumed);

    // Decode; key by expense identity. A record that does not decode is counted, not lost
    // silently (the benchmark's stream has none).
    KStream<String, Exp> updates =
        source.flatMap(
            (k, v) -> {
              try {
                Rec r = JSON.readValue(v, Rec.class);
                if (r.expense_id == null || r.user_id == null) {
                  REJECTED.incrementAndGet();
                  return List.of();
                }
                boolean delete = "delete".equals(r.op);
                if (!delete && r.amount_minor == null) {
                  REJECTED.incrementAndGet();
                  return List.of();
                }
                long amount = delete ? 0 : r.amount_minor;
                return List.of(
                    KeyValue.pair(
                        r.user_id + "/" + r.expense_id, new Exp(r.user_id, amount, !delete, 1)));
              } catch (IOException e) {
                REJECTED.incrementAndGet();
                return List.<KeyValue<String, Exp>>of();
              }
            });

    // The KTable of live expenses: the latest version per expense identity (a delete keeps the
    // key as a retracted version, so the records that reached it stay counted).
    KTable<String, Exp> expenses =
        updates
            .groupByKey(Grouped.with("expenses", Serdes.String(), EXP))
            .aggregate(
                () -> new Exp(0, 0, false, 0),
                (key, update, previous) ->
                    new Exp(update.user(), update.amount(), update.live(), previous.n() + 1),
                Materialized.<String, Exp, KeyValueStore<Bytes, byte[]>>as("expenses")
                    .withKeySerde(Serdes.String())
                    .withValueSerde(EXP));

    // Per user: the subtractor retracts the version an update replaced.
    KTable<Long, Agg> users =
        expenses
            .groupBy((key, e) -> KeyValue.pair(e.user(), e), Grouped.with("users", Serdes.Long(), EXP))
            .aggregate(
                () -> new Agg(0, 0, 0),
                (user, e, a) ->
                    new Agg(
                        a.total() + (e.live() ? e.amount() : 0),
                        a.count() + (e.live() ? 1 : 0),
                        a.records() + e.n()),
                (user, e, a) ->
                    new Agg(
                        a.total() - (e.live() ? e.amount() : 0),
                        a.count() - (e.live() ? 1 : 0),
                        a.records() - e.n()),
                Materialized.<Long, Agg, KeyValueStore<Bytes, byte[]>>as("users")
                    .withKeySerde(Serdes.Long())
                    .withValueSerde(AGG));

    users
        .toStream()
        .foreach(
            (user, a) -> {
              if (a == null) return;
              Agg before = USERS.put(user, a);
              RECORDS.addAndGet(a.records() - (before == null ? 0 : before.records()));
              if (user == marker && (before == null || before.count() != a.count())) {
                emit("MARK " + a.count() + " " + a.total() + " " + System.currentTimeMillis());
              }
            });

    Properties p = new Properties();
    p.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
    p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
    p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
    p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
    p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
    p.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");

    KafkaStreams streams = new KafkaStreams(builder.build(), p);
    streams.setUncaughtExceptionHandler(
        e -> {
          System.err.println("kstreams-baseline: stream thread failed: " + e);
          e.printStackTrace();
          return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
    streams.setStateListener(
        (now, before) -> {
          if (now == KafkaStreams.State.ERROR) {
            System.err.println("kstreams-baseline: Kafka Streams is in state ERROR");
            Runtime.getRuntime().halt(1);
          }
        });
    Runtime.getRuntime()
        .addShutdownHook(new Thread(() -> streams.close(Duration.ofSeconds(5)), "shutdown"));
    streams.start();
    emit("READY " + System.currentTimeMillis());

    long reported = -1;
    boolean written = totals.isEmpty() || expect < 0;
    while (true) {
      long records = RECORDS.get() + REJECTED.get();
      if (records != reported) {
        if (!written && records >= expect) {
          writeTotals(Path.of(totals));
          written = true;
        }
        emit("BATCH 0 " + System.currentTimeMillis() + " " + records);
        reported = records;
      }
      Thread.sleep(10);
    }
  }

  /** Every user's {@code user total count}, written to a temporary file and renamed. */
  static void writeTotals(Path path) throws IOException {
    Path tmp = path.resolveSibling(path.getFileName() + ".tmp");
    try (PrintWriter w = new PrintWriter(Files.newBufferedWriter(tmp))) {
      for (Map.Entry<Long, Agg> e : USERS.entrySet()) {
        w.println(e.getKey() + " " + e.getValue().total() + " " + e.getValue().count());
      }
    }
    Files.move(tmp, path, StandardCopyOption.ATOMIC_MOVE);
  }
}
