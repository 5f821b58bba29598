//! Real client programs through pgstash: pgbench in each query mode under
//! transaction pooling with more clients than server connections, and
//! psql's catalog queries, `\copy` and stop-on-error scripts.

mod support;

use std::process::{Output, Stdio};
use std::time::Duration;

use futures_util::TryStreamExt;
use support::TestProxy;
use tokio::process::Command;

/// Fewer server connections than pgbench's 16 clients, so clients keep
/// trading servers between transactions.
const POOL: &str = "[pool]\nsize = 6\n";

const CLIENTS: &str = "16";
const THREADS: &str = "2";
const SECONDS: &str = "10";

/// A client program that hangs is a failed test, not a stuck test run.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// `program` aimed at the proxy, with no `PG*` variables inherited: a
/// password, service file or PGOPTIONS from the caller's environment would
/// change what is being tested.
fn client(program: &str, proxy: &TestProxy) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            command.env_remove(name);
        }
    }
    command
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy.addr.port().to_string(),
            "-U",
            "postgres",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

fn psql(proxy: &TestProxy, database: &str) -> Command {
    let mut command = client("psql", proxy);
    // -X: a ~/.psqlrc must not change the output being checked.
    command.args(["-X", "-d", database]);
    command
}

/// A fresh database, dropped when the test ends whether it passed or not,
/// so failed runs leave nothing behind.
struct ScratchDb(String);

impl ScratchDb {
    async fn new(prefix: &str) -> ScratchDb {
        ScratchDb(support::fresh_database(prefix).await)
    }
}

impl std::ops::Deref for ScratchDb {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.0);
        // Drop runs on the test's runtime, which cannot block on itself.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(support::drop_database(&name));
            }
        })
        .join();
    }
}

async fn run(mut command: Command, what: &str) -> Output {
    let program = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    let child = command.output();
    match tokio::time::timeout(RUN_LIMIT, child).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{program}` is not on PATH: these tests need the PostgreSQL client programs \
             pgbench and psql (deploy/local-services.sh installs them)"
        ),
        Ok(Err(e)) => panic!("{what}: cannot run `{program}`: {e}"),
        Err(_) => panic!("{what}: `{program}` did not finish within {RUN_LIMIT:?}"),
    }
}

fn describe(what: &str, output: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn assert_success(what: &str, output: &Output) {
    assert!(output.status.success(), "{}", describe(what, output));
}

/// The numbers pgbench prints at the end of a run.
#[derive(Debug)]
struct Report {
    processed: u64,
    failed: u64,
    tps: f64,
}

fn parse_report(stdout: &str) -> Option<Report> {
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
    };
    Some(Report {
        processed: field("number of transactions actually processed: ")?
            .parse()
            .ok()?,
        failed: field("number of failed transactions: ")?.parse().ok()?,
        tps: field("tps = ")?.parse().ok()?,
    })
}

/// One timed pgbench run through the proxy; panics unless every client
/// ran to the end without a failed transaction.
async fn bench(
    proxy: &TestProxy,
    database: &str,
    mode: &str,
    workload: &[&str],
    name: &str,
) -> Report {
    let mut command = client("pgbench", proxy);
    command
        .args(["-c", CLIENTS, "-j", THREADS, "-T", SECONDS, "-M", mode])
        .args(workload)
        .arg(database);
    let what = format!("pgbench -M {mode} {name}");
    let output = run(command, &what).await;
    assert_success(&what, &output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("aborted"), "{}", describe(&what, &output));
    let report = parse_report(&String::from_utf8_lossy(&output.stdout))
        .unwrap_or_else(|| panic!("no pgbench summary; {}", describe(&what, &output)));
    assert_eq!(report.failed, 0, "{}", describe(&what, &output));
    assert!(report.processed > 0, "{}", describe(&what, &output));
    eprintln!(
        "{what}: {} transactions, {:.0} tps",
        report.processed, report.tps
    );
    report
}

/// Initialises a scale-2 pgbench database through the proxy, runs the
/// select-only and the TPC-B-like workload in `mode`, then checks on
/// Postgres directly that no committed transaction was lost or torn.
async fn pgbench_in_transaction_mode(mode: &str) {
    let database = ScratchDb::new("pgbench").await;
    let proxy = TestProxy::start(POOL).await;

    let mut init = client("pgbench", &proxy);
    init.args(["-i", "-s", "2", "-q"]).arg(&*database);
    let output = run(init, "pgbench -i").await;
    assert_success("pgbench -i -s 2", &output);

    bench(&proxy, &database, mode, &["-S"], "select-only").await;
    // pgbench empties pgbench_history before a run and -S changes no
    // balance, so the balances below all come from this one run.
    let tpcb = bench(&proxy, &database, mode, &[], "TPC-B").await;
    // Every client is gone; draining makes sure pgstash has finished with
    // the servers before their effects are checked.
    proxy.stop().await;

    let row = support::direct(&database)
        .await
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts)::bigint,
                    (SELECT sum(tbalance) FROM pgbench_tellers)::bigint,
                    (SELECT sum(bbalance) FROM pgbench_branches)::bigint,
                    (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::bigint,
                    (SELECT count(*) FROM pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    let sums: [i64; 4] = [row.get(0), row.get(1), row.get(2), row.get(3)];
    assert!(
        sums.iter().all(|s| *s == sums[0]),
        "-M {mode}: sums of accounts, tellers, branches, history differ: {sums:?}"
    );
    // A transaction pgbench counted had its COMMIT acknowledged; one cut
    // off at the end of the run may have committed without being counted.
    let history: i64 = row.get(4);
    assert!(
        history as u64 >= tpcb.processed,
        "-M {mode}: {history} history rows for {} acknowledged transactions",
        tpcb.processed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_simple_protocol() {
    pgbench_in_transaction_mode("simple").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_extended_protocol() {
    pgbench_in_transaction_mode("extended").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_statements() {
    pgbench_in_transaction_mode("prepared").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_describe_lists_what_was_created_through_the_proxy() {
    let database = ScratchDb::new("psql_d").await;
    let proxy = TestProxy::start(POOL).await;

    let mut create = psql(&proxy, &database);
    create.args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "CREATE TABLE orders (id bigint PRIMARY KEY, note text)",
        "-c",
        "CREATE TABLE \"Mixed Case\" (x int)",
        "-c",
        "CREATE VIEW recent_orders AS SELECT * FROM orders WHERE id > 10",
        "-c",
        "CREATE SEQUENCE order_numbers",
    ]);
    assert_success("psql CREATE", &run(create, "psql CREATE").await);

    let mut list = psql(&proxy, &database);
    list.args(["-At", "-c", "\\d"]);
    let output = run(list, "psql \\d").await;
    assert_success("psql \\d", &output);
    let mut relations: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    relations.sort();
    assert_eq!(
        relations,
        [
            "public|Mixed Case|table|postgres",
            "public|order_numbers|sequence|postgres",
            "public|orders|table|postgres",
            "public|recent_orders|view|postgres",
        ],
        "{}",
        describe("psql \\d", &output)
    );

    // \d TABLE runs several catalog queries in a row.
    let mut columns = psql(&proxy, &database);
    columns.args(["-c", "\\d orders"]);
    let output = run(columns, "psql \\d orders").await;
    assert_success("psql \\d orders", &output);
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "Table \"public.orders\"",
        "id",
        "bigint",
        "note",
        "\"orders_pkey\" PRIMARY KEY",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }

    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_to_and_from_a_file_round_trips() {
    let database = ScratchDb::new("psql_copy").await;
    let proxy = TestProxy::start(POOL).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("source.copy");
    let file_arg = file.to_str().expect("temp path is UTF-8");

    // Tabs, newlines, backslashes, NULLs and non-ASCII all need escaping
    // in COPY text format; 20,000 rows span many CopyData messages.
    let mut setup = psql(&proxy, &database);
    setup.args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "CREATE TABLE source (id int PRIMARY KEY, t text, n numeric, b bytea, ts timestamptz)",
        "-c",
        "INSERT INTO source SELECT i,
             CASE WHEN i % 7 = 0 THEN NULL ELSE E'tab\\there\\nnewline \\\\ back é ' || i END,
             i / 3.0,
             decode(md5(i::text), 'hex'),
             '2024-01-01 00:00:00+00'::timestamptz + i * interval '1 minute'
           FROM generate_series(1, 20000) i",
        "-c",
        "CREATE TABLE target (LIKE source)",
    ]);
    assert_success("psql setup", &run(setup, "psql setup").await);

    let mut out = psql(&proxy, &database);
    out.args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        &format!("\\copy source to '{file_arg}'"),
    ]);
    let output = run(out, "psql \\copy to").await;
    assert_success("psql \\copy to", &output);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "COPY 20000");

    let mut into = psql(&proxy, &database);
    into.args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        &format!("\\copy target from '{file_arg}'"),
    ]);
    let output = run(into, "psql \\copy from").await;
    assert_success("psql \\copy from", &output);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "COPY 20000");
    proxy.stop().await;

    // What psql wrote must be exactly what Postgres gives without the
    // proxy, and the reloaded table must give it back identically.
    let written = std::fs::read(&file).unwrap();
    let direct = support::direct(&database).await;
    for table in ["source", "target"] {
        let chunks: Vec<bytes::Bytes> = direct
            .copy_out(&format!("COPY {table} TO STDOUT"))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert!(
            chunks.concat() == written,
            "COPY {table} differs from the file psql wrote"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_script_stops_at_the_failing_statement() {
    let database = ScratchDb::new("psql_script").await;
    let proxy = TestProxy::start(POOL).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.sql");
    std::fs::write(
        &script,
        "CREATE TABLE steps (n int PRIMARY KEY);\n\
         INSERT INTO steps VALUES (1);\n\
         BEGIN;\n\
         INSERT INTO steps VALUES (2);\n\
         COMMIT;\n\
         SET application_name = 'script';\n\
         INSERT INTO steps VALUES (1);\n\
         INSERT INTO steps VALUES (3);\n\
         CREATE TABLE after_failure (x int);\n",
    )
    .unwrap();

    let mut command = psql(&proxy, &database);
    command.args(["-v", "ON_ERROR_STOP=1", "-f"]).arg(&script);
    let output = run(command, "psql -f").await;
    // psql's exit status 3 means: a script stopped on an error.
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}",
        describe("psql -f", &output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("script.sql:7:") && stderr.contains("duplicate key"),
        "{}",
        describe("psql -f", &output)
    );
    proxy.stop().await;

    let direct = support::direct(&database).await;
    let steps: Vec<i32> = direct
        .query("SELECT n FROM steps ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(steps, [1, 2]);
    let after: Option<String> = direct
        .query_one("SELECT to_regclass('after_failure')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, None, "a statement after the failure ran");
}
