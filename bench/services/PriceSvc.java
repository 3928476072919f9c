// An HTTP pricing service for the coldstart suite (bench/coldstart.py). Its hot path is what
// ordinary Java services spend their time in: the JDK's HTTP server, query parsing, regular
// expressions, String.format, BigDecimal arithmetic, streams, HashMap lookups, and two common
// libraries (Guava: immutable collections, Joiner, SHA-256 hashing; Apache Commons Lang:
// StringUtils) rendering and signing an invoice. Each quote prices ITEMS products (a few
// milliseconds of work once compiled), so the client's own cost is small beside it. A fresh JVM
// answers correctly as soon as its catalog is built, but runs that code interpreted and then
// through the JIT's tiers (C1, then C2) for seconds before it reaches its warm speed; that
// warm-up is what a restore of a warmed-up JVM keeps.
//
//   java -XX:-UsePerfData -cp DIR:guava.jar:commons-lang3.jar PriceSvc PORT [ITEMS]
//
// GET http://127.0.0.1:PORT/quote?seed=N -> "N TOTAL SHA\n": the price with discounts and tax of
// a basket of ITEMS products drawn from N and the first 16 hex digits of its invoice's SHA-256
// (deterministic, so the bench checks every answer against the warm original's).
// GET /ping -> "pong\n".
// -XX:-UsePerfData: no hsperfdata file in /tmp mapped into the process, which a restore would need.
import com.google.common.base.Joiner;
import com.google.common.collect.ImmutableMap;
import com.google.common.collect.ImmutableSortedMap;
import com.google.common.hash.Hashing;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.OutputStream;
import java.math.BigDecimal;
import java.math.RoundingMode;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Collectors;
import org.apache.commons.lang3.StringUtils;

public final class PriceSvc {
    static final int PRODUCTS = 50_000;
    static int ITEMS = 3000;
    static final String[] NAMES = new String[PRODUCTS];
    static Map<String, Product> CATALOG;
    static final Pattern SKU = Pattern.compile("sku-([a-p]{6})-(\\d+)");
    static final Pattern QUERY = Pattern.compile("(?:^|&)seed=(\\d+)(?:&|$)");
    static final BigDecimal TAX = new BigDecimal("1.0825");

    record Product(String name, BigDecimal price, int bulk, int discountPct, String category) {}

    record Line(Product product, int qty, BigDecimal amount) {}

    static long next(long x) { // xorshift64*: the same sequence in every run
        x ^= x >>> 12;
        x ^= x << 25;
        x ^= x >>> 27;
        return x * 0x2545F4914F6CDD1DL;
    }

    static String name(long r) {
        StringBuilder sb = new StringBuilder("sku-");
        for (int i = 0; i < 6; i++) {
            sb.append((char) ('a' + (int) ((r >>> (i * 5)) & 15)));
        }
        return sb.append('-').append(r & 1023).toString();
    }

    static String quote(long seed) {
        long x = seed * 0x9E3779B97F4A7C15L | 1;
        List<Line> lines = new ArrayList<>(ITEMS);
        for (int i = 0; i < ITEMS; i++) {
            x = next(x);
            // The basket names its products as a client would send them: parsed and validated.
            String text = String.format("%s", NAMES[(int) ((x >>> 1) % PRODUCTS)]);
            Matcher m = SKU.matcher(text);
            if (!m.matches()) {
                throw new IllegalStateException("bad sku " + text);
            }
            Product p = CATALOG.get("sku-" + m.group(1) + "-" + Integer.parseInt(m.group(2)));
            int qty = 1 + (int) ((x >>> 40) & 7);
            BigDecimal amount = p.price().multiply(BigDecimal.valueOf(qty));
            if (qty >= p.bulk()) {
                amount = amount.subtract(amount.multiply(BigDecimal.valueOf(p.discountPct())).movePointLeft(2));
            }
            lines.add(new Line(p, qty, amount.setScale(2, RoundingMode.HALF_EVEN)));
        }
        Map<String, BigDecimal> byCategory = lines.stream().collect(
            Collectors.groupingBy(l -> l.product().category(), Collectors.reducing(BigDecimal.ZERO, Line::amount, BigDecimal::add)));
        BigDecimal total = byCategory.values().stream().reduce(BigDecimal.ZERO, BigDecimal::add)
            .multiply(TAX).setScale(2, RoundingMode.HALF_EVEN);
        // The invoice: one line per item and a total per category, signed.
        StringBuilder invoice = new StringBuilder();
        for (Line l : lines) {
            invoice.append(Joiner.on(' ').join(StringUtils.rightPad(l.product().name(), 16),
                StringUtils.leftPad(Integer.toString(l.qty()), 3), StringUtils.leftPad(l.amount().toPlainString(), 10),
                StringUtils.capitalize(l.product().category()))).append('\n');
        }
        Joiner.on('\n').withKeyValueSeparator('=').appendTo(invoice, ImmutableSortedMap.copyOf(byCategory));
        String sha = Hashing.sha256().hashString(invoice, StandardCharsets.UTF_8).toString().substring(0, 16);
        return seed + " " + total.toPlainString() + " " + sha + "\n";
    }

    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        if (args.length > 1) {
            ITEMS = Integer.parseInt(args[1]);
        }
        // Headers and body go out in two writes: without TCP_NODELAY every answer waits for the
        // client's delayed ACK (40 ms).
        System.setProperty("sun.net.httpserver.nodelay", "true");
        String[] categories = {"food", "tools", "books", "toys", "garden", "office", "sports", "music"};
        long x = 0x1234_5678_9ABCL;
        Map<String, Product> catalog = new HashMap<>();
        for (int i = 0; i < PRODUCTS; i++) {
            x = next(x);
            String n;
            do {
                n = name(x);
                x = next(x);
            } while (catalog.containsKey(n));
            NAMES[i] = n;
            catalog.put(n, new Product(n, BigDecimal.valueOf(100 + (x & 0xFFFF), 2), 2 + (int) ((x >>> 20) & 3),
                (int) ((x >>> 30) % 20), categories[(int) ((x >>> 50) & 7)]));
        }
        CATALOG = ImmutableMap.copyOf(catalog);
        HttpServer server = HttpServer.create(new InetSocketAddress(InetAddress.getLoopbackAddress(), port), 64);
        server.createContext("/ping", ex -> reply(ex, 200, "pong\n"));
        server.createContext("/quote", ex -> {
            Matcher m = QUERY.matcher(ex.getRequestURI().getRawQuery() == null ? "" : ex.getRequestURI().getRawQuery());
            if (!m.find()) {
                reply(ex, 400, "need seed=N\n");
                return;
            }
            reply(ex, 200, quote(Long.parseLong(m.group(1))));
        });
        server.start();
    }

    static void reply(HttpExchange ex, int status, String body) throws java.io.IOException {
        byte[] bytes = body.getBytes(StandardCharsets.US_ASCII);
        ex.getResponseHeaders().set("Content-Type", "text/plain");
        ex.sendResponseHeaders(status, bytes.length);
        try (OutputStream out = ex.getResponseBody()) {
            out.write(bytes);
        }
    }
}
