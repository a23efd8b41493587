// A single-JVM HDFS for tests and local development: MiniDFSCluster with one NameNode and one
// DataNode, all on 127.0.0.1. Compiled and started by docker/native/services (javac once, then
// `java -cp <classes>:<jars> MiniDfs`). Configuration comes from system properties:
//
//   minidfs.dir        base directory (name/data dirs under <dir>/data, client conf in <dir>/conf)
//   minidfs.port       NameNode RPC port (9000)
//   minidfs.http       NameNode HTTP port (9870; WebHDFS and /jmx)
//   minidfs.datanodes  number of DataNodes (1)
//
// The name directory is formatted only on the first start, so data survives `services down/up`
// and a kill -9. The process runs until it gets SIGTERM (a shutdown hook stops the cluster).
import java.io.File;
import java.io.FileOutputStream;
import java.io.OutputStream;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.hdfs.DistributedFileSystem;
import org.apache.hadoop.hdfs.HdfsConfiguration;
import org.apache.hadoop.hdfs.MiniDFSCluster;

public class MiniDfs {
  public static void main(String[] args) throws Exception {
    String base = System.getProperty("minidfs.dir", "target/minidfs");
    int rpc = Integer.getInteger("minidfs.port", 9000);
    int http = Integer.getInteger("minidfs.http", 9870);
    int dataNodes = Integer.getInteger("minidfs.datanodes", 1);

    File dataDir = new File(base, "data");
    boolean format = !new File(dataDir, "name-0-1/current/VERSION").exists();

    Configuration conf = new HdfsConfiguration();
    conf.set(MiniDFSCluster.HDFS_MINIDFS_BASEDIR, dataDir.getAbsolutePath());
    conf.set("hadoop.tmp.dir", new File(base, "tmp").getAbsolutePath());
    conf.set("dfs.blocksize", "16777216");
    conf.setInt("dfs.replication", Math.min(dataNodes, 3));
    conf.setBoolean("dfs.permissions.enabled", false);
    conf.setInt("dfs.namenode.safemode.extension", 0);
    conf.setBoolean("dfs.namenode.datanode.registration.ip-hostname-check", false);
    // Small machine: keep the thread pools small.
    conf.setInt("dfs.namenode.handler.count", 4);
    conf.setInt("dfs.datanode.handler.count", 3);

    System.err.println("MiniDfs: starting (format=" + format + ", rpc=" + rpc + ", http=" + http
        + ", datanodes=" + dataNodes + ", dir=" + dataDir + ")");
    MiniDFSCluster cluster = new MiniDFSCluster.Builder(conf)
        .nameNodePort(rpc)
        .nameNodeHttpPort(http)
        .numDataNodes(dataNodes)
        .format(format)
        .build();
    Runtime.getRuntime().addShutdownHook(new Thread(() -> {
      System.err.println("MiniDfs: shutting down");
      cluster.shutdown();
    }, "minidfs-shutdown"));

    cluster.waitActive();
    DistributedFileSystem fs = cluster.getFileSystem();
    while (fs.isInSafeMode()) {
      Thread.sleep(200);
    }

    // Client configuration for tools (HADOOP_CONF_DIR=<dir>/conf).
    File confDir = new File(base, "conf");
    confDir.mkdirs();
    Configuration client = new Configuration(false);
    client.set("fs.defaultFS", "hdfs://127.0.0.1:" + rpc);
    client.set("dfs.replication", String.valueOf(Math.min(dataNodes, 3)));
    try (OutputStream out = new FileOutputStream(new File(confDir, "core-site.xml"))) {
      client.writeXml(out);
    }

    System.out.println("Ready! hdfs://127.0.0.1:" + rpc);
    System.out.flush();
    Thread.currentThread().join(); // until SIGTERM
  }
}
