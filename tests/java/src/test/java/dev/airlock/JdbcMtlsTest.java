package dev.airlock;

import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assumptions.assumeTrue;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * The Flight SQL JDBC driver over mutual TLS: `airlock demo` with --tls-cert, --tls-key and
 * --tls-client-ca, certificates from tests/python/pki.py (the directory in -DairlockPki).
 */
class JdbcMtlsTest {
  private static Process server;
  private static int port;
  private static Path pki;

  @BeforeAll
  static void startServer() throws Exception {
    String dir = System.getProperty("airlock.pki");
    assumeTrue(
        dir != null && !dir.isEmpty() && !dir.startsWith("${"),
        "no -DairlockPki: the mutual-TLS test needs certificates from tests/python/pki.py");
    pki = Path.of(dir);
    Path state = Files.createTempDirectory("airlock-jdbc-mtls");
    server =
        new ProcessBuilder(
                System.getProperty("airlock.bin"), "demo", "--listen", "127.0.0.1:0",
                "--state-dir", state.toString(), "--patients", "2000", "--console-listen", "off",
                "--tls-cert", pki.resolve("server.pem").toString(),
                "--tls-key", pki.resolve("server.key").toString(),
                "--tls-client-ca", pki.resolve("ca.pem").toString())
            .redirectError(ProcessBuilder.Redirect.INHERIT)
            .start();
    BufferedReader out =
        new BufferedReader(new InputStreamReader(server.getInputStream(), StandardCharsets.UTF_8));
    Pattern ready = Pattern.compile("airlock listening on \\S+:(\\d+)");
    String line;
    while ((line = out.readLine()) != null) {
      Matcher m = ready.matcher(line);
      if (m.find()) {
        port = Integer.parseInt(m.group(1));
        break;
      }
    }
    if (port == 0) {
      throw new IllegalStateException("airlock demo did not start");
    }
    Thread drain =
        new Thread(
            () -> {
              try {
                while (out.readLine() != null) {}
              } catch (Exception ignored) {
                // the server is gone
              }
            });
    drain.setDaemon(true);
    drain.start();
  }

  @AfterAll
  static void stopServer() {
    if (server != null) {
      server.destroy();
    }
  }

  private static Connection connect(String client) throws SQLException {
    Properties props = new Properties();
    props.put("user", "analyst");
    props.put("password", "analyst");
    props.put("useEncryption", "true");
    props.put("tlsRootCerts", pki.resolve("ca.pem").toString());
    if (client != null) {
      props.put("clientCertificate", pki.resolve(client + ".pem").toString());
      props.put("clientKey", pki.resolve(client + ".key").toString());
    }
    return DriverManager.getConnection("jdbc:arrow-flight-sql://localhost:" + port, props);
  }

  @Test
  void aClientCertificateFromTheCaConnects() throws Exception {
    try (Connection conn = connect("analyst");
        Statement st = conn.createStatement();
        ResultSet rs =
            st.executeQuery("SELECT ward, count(*) AS n FROM hospital.patients GROUP BY ward")) {
      assertTrue(rs.next(), "grouped rows over mutual TLS");
    }
  }

  @Test
  void noCertificateAnotherCaOrAnExpiredOneIsRefused() {
    for (String client : new String[] {null, "other-ca", "expired"}) {
      assertThrows(
          SQLException.class,
          () -> {
            try (Connection conn = connect(client);
                Statement st = conn.createStatement();
                ResultSet rs = st.executeQuery("SELECT 1")) {
              rs.next();
            }
          },
          "client certificate: " + client);
    }
  }
}
