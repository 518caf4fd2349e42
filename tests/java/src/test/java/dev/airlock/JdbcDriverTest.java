package dev.airlock;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** The Apache Arrow Flight SQL JDBC driver against a real `airlock demo` on 127.0.0.1:0. */
class JdbcDriverTest {
  private static Process server;
  private static String address;

  @BeforeAll
  static void startServer() throws Exception {
    String bin = System.getProperty("airlock.bin");
    Path state = Files.createTempDirectory("airlock-jdbc");
    server =
        new ProcessBuilder(
                bin, "demo", "--listen", "127.0.0.1:0", "--state-dir", state.toString(),
                "--patients", "5000", "--console-listen", "off")
            .redirectError(ProcessBuilder.Redirect.INHERIT)
            .start();
    BufferedReader out =
        new BufferedReader(new InputStreamReader(server.getInputStream(), StandardCharsets.UTF_8));
    Pattern ready = Pattern.compile("airlock listening on (\\S+)");
    String line;
    while ((line = out.readLine()) != null) {
      Matcher m = ready.matcher(line);
      if (m.find()) {
        address = m.group(1);
        break;
      }
    }
    if (address == null) {
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

  private static Connection connect(String user, String password) throws SQLException {
    Properties props = new Properties();
    props.put("user", user);
    props.put("password", password);
    props.put("useEncryption", "false");
    return DriverManager.getConnection("jdbc:arrow-flight-sql://" + address, props);
  }

  @Test
  void metadataListsOnlyVisibleTables() throws Exception {
    try (Connection conn = connect("analyst", "analyst")) {
      DatabaseMetaData md = conn.getMetaData();
      List<String> tables = new ArrayList<>();
      try (ResultSet rs = md.getTables(null, null, "%", null)) {
        while (rs.next()) {
          tables.add(rs.getString("TABLE_SCHEM") + "." + rs.getString("TABLE_NAME"));
        }
      }
      assertTrue(tables.contains("hospital.patients"), tables.toString());
      assertTrue(tables.contains("hospital.visits"), tables.toString());
      assertFalse(tables.contains("hospital.staff"), "staff is invisible to the analyst");
    }
    try (Connection conn = connect("owner", "owner");
        ResultSet rs = conn.getMetaData().getTables(null, "hospital", "staff", null)) {
      assertTrue(rs.next(), "the owner sees staff");
    }
  }

  @Test
  void getColumnsDescribesATable() throws Exception {
    try (Connection conn = connect("analyst", "analyst");
        ResultSet rs = conn.getMetaData().getColumns(null, "hospital", "patients", "%")) {
      List<String> columns = new ArrayList<>();
      while (rs.next()) {
        columns.add(rs.getString("COLUMN_NAME") + ":" + rs.getString("TYPE_NAME"));
      }
      assertTrue(columns.stream().anyMatch(c -> c.startsWith("patient_id:")), columns.toString());
      assertTrue(columns.stream().anyMatch(c -> c.startsWith("diagnosis:")), columns.toString());
      assertEquals(11, columns.size(), columns.toString());
    }
  }

  @Test
  void statementQuery() throws Exception {
    try (Connection conn = connect("analyst", "analyst");
        Statement st = conn.createStatement();
        ResultSet rs =
            st.executeQuery(
                "SELECT ward, count(*) AS n FROM hospital.patients GROUP BY ward ORDER BY ward")) {
      long total = 0;
      int rows = 0;
      while (rs.next()) {
        assertEquals(1, rs.getString("ward").length());
        total += rs.getLong("n");
        rows++;
      }
      assertEquals(6, rows);
      assertEquals(5000, total);
    }
  }

  @Test
  void preparedStatementWithAParameter() throws Exception {
    try (Connection conn = connect("owner", "owner");
        PreparedStatement ps =
            conn.prepareStatement("SELECT count(*) AS n FROM hospital.patients WHERE age >= ?")) {
      ps.setInt(1, 60);
      long old;
      try (ResultSet rs = ps.executeQuery()) {
        assertTrue(rs.next());
        old = rs.getLong(1);
      }
      ps.setInt(1, 0);
      try (ResultSet rs = ps.executeQuery()) {
        assertTrue(rs.next());
        assertEquals(5000, rs.getLong(1));
      }
      assertTrue(old > 0 && old < 5000, "age filter applied: " + old);
    }
  }

  @Test
  void refusalsReachTheDriverWithTheirCode() throws Exception {
    try (Connection conn = connect("analyst", "analyst");
        Statement st = conn.createStatement()) {
      SQLException e =
          assertThrows(SQLException.class, () -> st.executeQuery("DROP TABLE hospital.patients"));
      assertTrue(fullMessage(e).contains("[STATEMENT_NOT_ALLOWED]"), fullMessage(e));
      SQLException missing =
          assertThrows(SQLException.class, () -> st.executeQuery("SELECT count(*) FROM hospital.staff"));
      assertTrue(fullMessage(missing).contains("not found"), fullMessage(missing));
    }
  }

  @Test
  void wrongPasswordIsRefused() {
    SQLException e = assertThrows(SQLException.class, () -> connect("analyst", "wrong").close());
    assertTrue(fullMessage(e).toLowerCase().contains("unauthenticated")
        || fullMessage(e).contains("invalid username or password"), fullMessage(e));
  }

  private static String fullMessage(Throwable t) {
    StringBuilder sb = new StringBuilder();
    for (Throwable c = t; c != null; c = c.getCause()) {
      sb.append(c.getMessage()).append(" | ");
    }
    return sb.toString();
  }
}
