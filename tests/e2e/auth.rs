//! Authentication: towards clients (SCRAM, md5, trust) and towards servers.

use crate::harness::{sqlstate, Env, APP_PASSWORD};

async fn login(env: &Env, user: &str, password: &str, db: &str) -> Result<i32, String> {
    let client = env
        .connect_as(user, password, db)
        .await
        .map_err(|e| sqlstate(&e))?;
    let row = client
        .query_one("SELECT 7", &[])
        .await
        .map_err(|e| sqlstate(&e))?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authentication_methods() {
    let env = Env::start().await;
    let cases: &[(&str, &str, &str, Result<i32, &str>)] = &[
        ("app", APP_PASSWORD, "db", Ok(7)),
        ("app", "wrong", "db", Err("28P01")),
        ("app_verifier", "verifier-pass", "db", Ok(7)),
        ("app_verifier", "wrong", "db", Err("28P01")),
        ("md5_client", "md5-client-pass", "db", Ok(7)),
        ("md5_client", "wrong", "db", Err("28P01")),
        ("md5_client_stored", "md5-client-pass", "db", Ok(7)),
        ("md5_client_stored", "wrong", "db", Err("28P01")),
        ("trusted", "anything", "db", Ok(7)),
        ("nobody", "x", "db", Err("28P01")),
        ("app", APP_PASSWORD, "no_such_db", Err("3D000")),
    ];
    for (user, password, db, expected) in cases {
        let got = login(&env, user, password, db).await;
        assert_eq!(got, expected.map_err(str::to_owned), "{user} / {db}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_message_says_nothing_about_the_server() {
    let env = Env::start().await;
    let err = env.connect_as("app", "wrong", "db").await.err().unwrap();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(
        db.message(),
        "password authentication failed for user \"app\""
    );
    assert!(!db.message().contains(&env.pg.port().to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_authentication_methods() {
    let env = Env::start().await;
    for db in ["db_md5", "db_trust", "db_scram", "db"] {
        assert_eq!(
            login(&env, "trusted", "", db).await,
            Ok(7),
            "server login for {db}"
        );
    }
}
