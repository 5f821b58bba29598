//! Checks of the deployment files under deploy/: they parse and match the
//! Kubernetes API (deploy/validate.py), the alert rules and dashboard
//! queries pass promtool, every pgstash_* metric they use is one
//! src/admin/metrics.rs documents, each container's configuration is one
//! pgstash accepts, and the image builds the binary the way CI does.
//!
//! Needs python3 (validate.py installs its packages with pip if missing) and
//! promtool (Debian: `apt-get install prometheus`); PGSTASH_SKIP_PROMTOOL=1
//! skips the promtool checks where it cannot be had.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Labels Prometheus or the Prometheus Operator put on every scraped series.
const TARGET_LABELS: [&str; 6] = [
    "namespace",
    "pod",
    "container",
    "job",
    "instance",
    "endpoint",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative))
        .unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

fn describe(output: &Output) -> String {
    format!(
        "{}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// What validate.py found, read back from its --emit directory.
struct Facts {
    metric_refs: Vec<MetricRef>,
    dashboard_rules: String,
    configs: Vec<ContainerConfig>,
}

/// One label matcher (or none) of a pgstash_* selector.
struct MetricRef {
    source: String,
    metric: String,
    label: String,
    op: String,
    value: String,
}

/// A pgstash container's config file and environment.
struct ContainerConfig {
    source: String,
    proxy_toml: String,
    env: Vec<(String, String)>,
}

/// Runs validate.py once for all tests; an error is its output.
fn facts() -> &'static Facts {
    static FACTS: OnceLock<Result<Facts, String>> = OnceLock::new();
    match FACTS.get_or_init(run_validator) {
        Ok(facts) => facts,
        Err(e) => panic!("{e}"),
    }
}

fn run_validator() -> Result<Facts, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let output = Command::new("python3")
        .arg(repo().join("deploy/validate.py"))
        .arg("--emit")
        .arg(dir.path())
        .output()
        .map_err(|e| format!("cannot run python3 deploy/validate.py: {e}"))?;
    if !output.status.success() {
        return Err(format!("deploy/validate.py failed: {}", describe(&output)));
    }
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()));
    let metric_refs = read(dir.path().join("metric-refs.tsv"))?
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            match f[..] {
                [source, metric, label, op, value] => Ok(MetricRef {
                    source: source.into(),
                    metric: metric.into(),
                    label: label.into(),
                    op: op.into(),
                    value: value.into(),
                }),
                _ => Err(format!("metric-refs.tsv: cannot read {line:?}")),
            }
        })
        .collect::<Result<_, _>>()?;
    let mut configs = Vec::new();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir.path().join("configs"))
        .map_err(|e| e.to_string())?
        .map(|entry| entry.map(|e| e.path()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    dirs.sort();
    for d in dirs {
        let env = read(d.join("env"))?
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        configs.push(ContainerConfig {
            source: read(d.join("source"))?.trim().to_owned(),
            proxy_toml: read(d.join("proxy.toml"))?,
            env,
        });
    }
    Ok(Facts {
        metric_refs,
        dashboard_rules: read(dir.path().join("dashboard-rules.yaml"))?,
        configs,
    })
}

/// promtool, or None when it is missing and PGSTASH_SKIP_PROMTOOL=1.
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("promtool");
    }
    if std::env::var("PGSTASH_SKIP_PROMTOOL").as_deref() == Ok("1") {
        eprintln!("promtool not found: skipped (PGSTASH_SKIP_PROMTOOL=1)");
        return None;
    }
    panic!(
        "promtool not found: install it (Debian: apt-get install prometheus), \
         or set PGSTASH_SKIP_PROMTOOL=1 to skip the promtool checks"
    );
}

fn run_promtool(promtool: &str, args: &[&str], dir: &Path) {
    let output = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    assert!(
        output.status.success(),
        "promtool {} failed: {}",
        args.join(" "),
        describe(&output)
    );
}

#[test]
fn deploy_files_validate() {
    let facts = facts();
    assert!(!facts.metric_refs.is_empty(), "no pgstash_* metric found");
    assert!(!facts.configs.is_empty(), "no pgstash container found");
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else { return };
    let dir = repo().join("deploy/prometheus");
    run_promtool(promtool, &["check", "rules", "alerts.yaml"], &dir);
    run_promtool(promtool, &["test", "rules", "alerts.test.yaml"], &dir);
}

#[test]
fn dashboard_queries_pass_promtool() {
    let rules = &facts().dashboard_rules;
    let Some(promtool) = promtool() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard-rules.yaml"), rules).unwrap();
    run_promtool(
        promtool,
        &["check", "rules", "dashboard-rules.yaml"],
        dir.path(),
    );
}

/// A row of the table at the top of src/admin/metrics.rs.
struct Documented {
    kind: String,
    /// Label name -> the values listed for it (none listed: any value).
    labels: BTreeMap<String, Vec<String>>,
}

/// Reads `//! | \`name\` | type | \`label\` = a, b |` rows.
fn documented_metrics() -> BTreeMap<String, Documented> {
    let mut metrics = BTreeMap::new();
    for line in read("src/admin/metrics.rs").lines() {
        let Some(row) = line.strip_prefix("//! | `pgstash_") else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let [name, kind, labels, ..] = cells[..] else {
            panic!("src/admin/metrics.rs: cannot read the table row {line:?}");
        };
        let name = format!("pgstash_{}", name.trim_end_matches('`'));
        // "`outcome` = hit, miss, bypass": names in backticks, listed values
        // after an `=`.
        let mut parsed = BTreeMap::new();
        let mut parts = labels.split('`').skip(1);
        while let Some(label) = parts.next() {
            let after = parts.next().unwrap_or("");
            let values = after
                .trim()
                .strip_prefix('=')
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            parsed.insert(label.to_owned(), values);
        }
        metrics.insert(
            name,
            Documented {
                kind: kind.to_owned(),
                labels: parsed,
            },
        );
    }
    assert!(
        metrics.len() >= 10,
        "src/admin/metrics.rs: found only {} metrics in the table",
        metrics.len()
    );
    metrics
}

/// Why `r` does not fit the documentation, if it does not.
fn undocumented(r: &MetricRef, documented: &BTreeMap<String, Documented>) -> Option<String> {
    let histogram_part = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = r.metric.strip_suffix(suffix)?;
        let doc = documented.get(base).filter(|d| d.kind == "histogram")?;
        Some((*suffix, doc))
    });
    let doc = match (documented.get(&r.metric), histogram_part) {
        (Some(doc), _) => doc,
        (None, Some((_, doc))) => doc,
        (None, None) => return Some(format!("{} is not documented", r.metric)),
    };
    if r.label.is_empty()
        || TARGET_LABELS.contains(&r.label.as_str())
        || (r.label == "le" && matches!(histogram_part, Some(("_bucket", _))))
    {
        return None;
    }
    let Some(values) = doc.labels.get(&r.label) else {
        return Some(format!("{} has no label {}", r.metric, r.label));
    };
    // A listed value set, and an equality or plain alternation matcher.
    let literal = r
        .value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '|');
    if values.is_empty() || !matches!(r.op.as_str(), "=" | "=~") || !literal {
        return None;
    }
    r.value
        .split('|')
        .find(|v| !values.iter().any(|known| known == v))
        .map(|v| {
            format!(
                "{}{{{}=\"{v}\"}}: {} is one of {values:?}",
                r.metric, r.label, r.label
            )
        })
}

#[test]
fn metrics_used_are_documented() {
    let documented = documented_metrics();
    let mut problems = BTreeSet::new();
    for r in &facts().metric_refs {
        if let Some(why) = undocumented(r, &documented) {
            problems.insert(format!("{}: {why}", r.source));
        }
    }
    assert!(
        problems.is_empty(),
        "metrics not in the table of src/admin/metrics.rs:\n{}",
        problems.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn container_configs_are_accepted() {
    let mut problems = Vec::new();
    for config in &facts().configs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, &config.proxy_toml).unwrap();
        // Only the container's own environment, none of this process's
        // PGSTASH_* variables.
        let output = Command::new(env!("CARGO_BIN_EXE_pgstash"))
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env_clear()
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run pgstash check-config");
        if !output.status.success() {
            problems.push(format!("{}: {}", config.source, describe(&output)));
        }
    }
    assert!(
        problems.is_empty(),
        "pgstash check-config refused:\n{}",
        problems.join("\n")
    );
}

/// The `cargo build --release ...` commands in a file: each as written,
/// and as the set of its words without --quiet (which changes only what is
/// printed, not what is built).
fn release_builds(text: &str) -> Vec<(String, BTreeSet<String>)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.find("cargo build --release").map(|at| &l[at..]))
        .map(|rest| {
            let words: Vec<&str> = rest
                .split_whitespace()
                .take_while(|w| {
                    !matches!(*w, "&&" | "||" | ";" | "|" | "\\") && !w.starts_with('#')
                })
                .collect();
            let flags = words
                .iter()
                .filter(|w| !matches!(**w, "--quiet" | "-q"))
                .map(|w| w.to_string())
                .collect();
            (words.join(" "), flags)
        })
        .collect()
}

#[test]
fn docker_image_builds_like_ci() {
    let docker = release_builds(&read("deploy/Dockerfile"));
    let ci = release_builds(&read(".ci/run"));
    let [(docker_line, docker_flags)] = &docker[..] else {
        panic!("deploy/Dockerfile: want one `cargo build --release`, found {docker:?}");
    };
    let [(ci_line, ci_flags)] = &ci[..] else {
        panic!(".ci/run: want one `cargo build --release`, found {ci:?}");
    };
    assert_eq!(
        docker_flags, ci_flags,
        "deploy/Dockerfile runs `{docker_line}` but .ci/run runs `{ci_line}`: the image must \
         be built as CI builds and tests the binary (only --quiet may differ)"
    );
}
