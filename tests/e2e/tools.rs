//! The stock tools through the proxy: psql and pgbench in every query mode.

use crate::harness::{tool, Env, APP_PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_commands() {
    let env = Env::start().await;
    let url = env.url("app", APP_PASSWORD, "db");
    let output = tokio::task::spawn_blocking(move || {
        tool("psql")
            .args([
                url.as_str(),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "SELECT 40 + 2",
                "-c",
                "SHOW server_version",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("42"));
    assert!(lines.next().unwrap().starts_with("15"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_in_every_query_mode() {
    let env = Env::start().await;
    let url = env.url("app", APP_PASSWORD, "db");
    let init = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            tool("pgbench")
                .args(["-i", "-s", "1", "-q", url.as_str()])
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    for mode in ["simple", "extended", "prepared"] {
        let url = url.clone();
        let run = tokio::task::spawn_blocking(move || {
            tool("pgbench")
                .args(["-M", mode, "-c", "8", "-j", "2", "-t", "50", url.as_str()])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "pgbench -M {mode}: {stdout}{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            stdout.contains("number of transactions actually processed: 400/400"),
            "-M {mode}: {stdout}"
        );
        assert!(
            stdout.contains("number of failed transactions: 0 "),
            "-M {mode}: {stdout}"
        );
    }
}
