//! The custom scenario: one SQL statement from a file, its parameters drawn
//! from distributions declared in header comments, so a user can load their
//! own query shape without writing code.
//!
//! ```sql
//! -- $1: uniform 1 100000
//! -- $2: zipf 1 100000 1.1
//! -- $3: const 42
//! SELECT * FROM accounts WHERE id = $1 OR id = $2 LIMIT $3
//! ```
//!
//! `uniform LO HI` and `zipf LO HI SKEW` draw integers in `LO..=HI` (zipf:
//! LO most often); `const VALUE` is always VALUE. Values are sent as the
//! type PostgreSQL infers for the parameter: int2, int4, int8, float4,
//! float8 and text (text, varchar, bpchar, name); cast in the SQL for others.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use bytes::BytesMut;
use rand::distributions::{Distribution, Uniform};
use rand::Rng;
use rand_distr::Zipf;
use serde::Serialize;
use tokio_postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// The most parameters a custom statement may declare.
const PARAMS_MAX: usize = 64;
/// The largest custom SQL file read.
const FILE_BYTES_MAX: u64 = 1 << 20;

/// A custom statement and how to draw each of its parameters.
#[derive(Clone, Debug, Serialize)]
pub struct CustomSql {
    pub path: PathBuf,
    pub sql: String,
    /// `params[i]` draws `$i+1`.
    pub params: Vec<Draw>,
}

/// How one parameter is drawn.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "draw", rename_all = "kebab-case")]
pub enum Draw {
    Uniform { lo: i64, hi: i64 },
    Zipf { lo: i64, hi: i64, skew: f64 },
    Const { value: String },
}

impl CustomSql {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> anyhow::Result<CustomSql> {
        let size = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        if size > FILE_BYTES_MAX {
            bail!(
                "{} is {size} bytes; at most {FILE_BYTES_MAX}",
                path.display()
            );
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let (sql, params) = parse(&text).with_context(|| format!("in {}", path.display()))?;
        Ok(CustomSql {
            path: path.to_owned(),
            sql,
            params,
        })
    }
}

/// Splits a custom file into its statement and parameter draws.
fn parse(text: &str) -> anyhow::Result<(String, Vec<Draw>)> {
    let mut params: Vec<Option<Draw>> = Vec::new();
    let mut sql = String::new();
    for (number, line) in (1..).zip(text.lines()) {
        let trimmed = line.trim();
        let header = trimmed
            .strip_prefix("--")
            .map(str::trim)
            .filter(|h| h.starts_with('$'));
        let Some(header) = header else {
            if !trimmed.starts_with("--") {
                sql.push_str(line);
                sql.push('\n');
            }
            continue;
        };
        let (index, draw) = parse_header(header).with_context(|| format!("line {number}"))?;
        if index > params.len() {
            params.resize(index, None);
        }
        if params[index - 1].replace(draw).is_some() {
            bail!("line {number}: ${index} is described twice");
        }
    }
    let sql = sql.trim().trim_end_matches(';').trim().to_owned();
    if sql.is_empty() {
        bail!("no SQL statement (only comments)");
    }
    let params = params
        .into_iter()
        .enumerate()
        .map(|(i, d)| d.with_context(|| format!("${} has no `-- ${}: ...` line", i + 1, i + 1)))
        .collect::<anyhow::Result<Vec<Draw>>>()?;
    Ok((sql, params))
}

/// Parses `$N: kind args...` into `N` (from 1) and its draw.
fn parse_header(header: &str) -> anyhow::Result<(usize, Draw)> {
    let (name, spec) = header
        .split_once(':')
        .context("expected `-- $N: uniform LO HI | zipf LO HI SKEW | const VALUE`")?;
    let index: usize = name[1..]
        .trim()
        .parse()
        .with_context(|| format!("`{name}` is not a parameter like $1"))?;
    if index == 0 || index > PARAMS_MAX {
        bail!("parameters are $1 to ${PARAMS_MAX}");
    }
    let spec = spec.trim();
    let (kind, args) = spec.split_once(char::is_whitespace).unwrap_or((spec, ""));
    let args: Vec<&str> = args.split_whitespace().collect();
    let int = |s: &str| -> anyhow::Result<i64> {
        s.parse()
            .with_context(|| format!("`{s}` is not an integer"))
    };
    let draw = match (kind, args.as_slice()) {
        ("uniform", [lo, hi]) => Draw::Uniform {
            lo: int(lo)?,
            hi: int(hi)?,
        },
        ("zipf", [lo, hi, skew]) => Draw::Zipf {
            lo: int(lo)?,
            hi: int(hi)?,
            skew: skew
                .parse()
                .with_context(|| format!("`{skew}` is not a number"))?,
        },
        ("const", _) if !args.is_empty() => Draw::Const {
            value: spec[kind.len()..].trim().to_owned(),
        },
        _ => bail!("`{spec}`: expected `uniform LO HI`, `zipf LO HI SKEW` or `const VALUE`"),
    };
    match draw {
        Draw::Uniform { lo, hi } | Draw::Zipf { lo, hi, .. } if lo > hi => {
            bail!("{lo} > {hi}")
        }
        Draw::Zipf { skew, .. } if !(skew >= 0.0 && skew.is_finite()) => {
            bail!("the zipf skew must be a finite number >= 0")
        }
        _ => {}
    }
    Ok((index, draw))
}

/// Draws a statement's parameters as the types PostgreSQL expects.
pub struct Sampler {
    params: Vec<(Source, Type)>,
}

enum Source {
    Uniform(Uniform<i64>),
    Zipf { lo: i64, dist: Zipf<f64> },
    Const(ParamValue),
}

impl Sampler {
    /// A sampler for `draws` given the parameter types of the prepared statement.
    pub fn new(draws: &[Draw], types: &[Type]) -> anyhow::Result<Sampler> {
        if draws.len() != types.len() {
            bail!(
                "the statement takes {} parameters but the file describes {}",
                types.len(),
                draws.len()
            );
        }
        let params = draws
            .iter()
            .zip(types)
            .map(|(draw, ty)| {
                let source = match draw {
                    Draw::Uniform { lo, hi } => {
                        convert(*lo, ty).and(convert(*hi, ty))?;
                        Source::Uniform(Uniform::new_inclusive(*lo, *hi))
                    }
                    Draw::Zipf { lo, hi, skew } => {
                        convert(*lo, ty).and(convert(*hi, ty))?;
                        let count = u64::try_from(hi - lo).context("range too large")? + 1;
                        Source::Zipf {
                            lo: *lo,
                            dist: Zipf::new(count, *skew).context("zipf")?,
                        }
                    }
                    Draw::Const { value } => Source::Const(parse_const(value, ty)?),
                };
                anyhow::Ok((source, ty.clone()))
            })
            .enumerate()
            .map(|(i, r)| r.with_context(|| format!("parameter ${}", i + 1)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Sampler { params })
    }

    /// One set of parameter values.
    pub fn draw(&self, rng: &mut impl Rng) -> Vec<ParamValue> {
        self.params
            .iter()
            .map(|(source, ty)| {
                let n = match source {
                    Source::Uniform(u) => u.sample(rng),
                    // Zipf yields 1..=count as a float.
                    Source::Zipf { lo, dist } => lo + dist.sample(rng) as i64 - 1,
                    Source::Const(v) => return v.clone(),
                };
                convert(n, ty).expect("the range was checked against the type")
            })
            .collect()
    }
}

/// A parameter value in the representation its type wants.
#[derive(Clone, Debug)]
pub enum ParamValue {
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Text(String),
}

fn is_text(ty: &Type) -> bool {
    matches!(*ty, Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME)
}

/// `n` as a value of type `ty`.
fn convert(n: i64, ty: &Type) -> anyhow::Result<ParamValue> {
    Ok(match *ty {
        Type::INT2 => ParamValue::I16(i16::try_from(n).context("out of range for int2")?),
        Type::INT4 => ParamValue::I32(i32::try_from(n).context("out of range for int4")?),
        Type::INT8 => ParamValue::I64(n),
        Type::FLOAT4 => ParamValue::F32(n as f32),
        Type::FLOAT8 => ParamValue::F64(n as f64),
        _ if is_text(ty) => ParamValue::Text(n.to_string()),
        _ => bail!(unsupported(ty)),
    })
}

/// A `const` value as type `ty`.
fn parse_const(value: &str, ty: &Type) -> anyhow::Result<ParamValue> {
    let bad = || format!("`{value}` is not a valid {ty}");
    Ok(match *ty {
        Type::INT2 => ParamValue::I16(value.parse().with_context(bad)?),
        Type::INT4 => ParamValue::I32(value.parse().with_context(bad)?),
        Type::INT8 => ParamValue::I64(value.parse().with_context(bad)?),
        Type::FLOAT4 => ParamValue::F32(value.parse().with_context(bad)?),
        Type::FLOAT8 => ParamValue::F64(value.parse().with_context(bad)?),
        _ if is_text(ty) => ParamValue::Text(value.to_owned()),
        _ => bail!(unsupported(ty)),
    })
}

fn unsupported(ty: &Type) -> String {
    format!(
        "PostgreSQL expects type {ty}; custom parameters can be int2, int4, int8, \
         float4, float8 or text (cast in the SQL, e.g. `$1::text::numeric`)"
    )
}

impl ToSql for ParamValue {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            ParamValue::I16(v) => v.to_sql(ty, out),
            ParamValue::I32(v) => v.to_sql(ty, out),
            ParamValue::I64(v) => v.to_sql(ty, out),
            ParamValue::F32(v) => v.to_sql(ty, out),
            ParamValue::F64(v) => v.to_sql(ty, out),
            ParamValue::Text(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT2 | Type::INT4 | Type::INT8 | Type::FLOAT4 | Type::FLOAT8
        ) || is_text(ty)
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers_and_statement() {
        let text = "-- a comment\n-- $2: zipf 1 100 1.1\n-- $1: uniform 1 10\n\
                    -- $3: const hello world\nSELECT $1, $2,\n  $3;\n";
        let (sql, params) = parse(text).expect("valid");
        assert_eq!(sql, "SELECT $1, $2,\n  $3");
        assert_eq!(
            params,
            vec![
                Draw::Uniform { lo: 1, hi: 10 },
                Draw::Zipf {
                    lo: 1,
                    hi: 100,
                    skew: 1.1
                },
                Draw::Const {
                    value: "hello world".into()
                },
            ]
        );
    }

    #[test]
    fn refuses_bad_files() {
        for (text, why) in [
            ("-- $1: uniform 1 10\n", "no SQL statement"),
            ("-- $2: uniform 1 10\nSELECT $2", "$1 has no"),
            ("-- $1: uniform 10 1\nSELECT $1", "10 > 1"),
            ("-- $1: normal 1 10\nSELECT $1", "expected"),
            ("-- $1: const 1\n-- $1: const 2\nSELECT $1", "twice"),
            ("-- $0: const 1\nSELECT 1", "parameters are"),
            ("-- $1: zipf 1 10 -1\nSELECT $1", "skew"),
        ] {
            let e = format!("{:#}", parse(text).expect_err(text));
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn draws_stay_in_range_and_type() {
        let draws = [
            Draw::Uniform { lo: 5, hi: 7 },
            Draw::Zipf {
                lo: 10,
                hi: 12,
                skew: 1.0,
            },
            Draw::Const { value: "x".into() },
        ];
        let sampler = Sampler::new(&draws, &[Type::INT4, Type::INT8, Type::TEXT]).expect("valid");
        let mut rng = rand::thread_rng();
        for _ in 0..1000 {
            match sampler.draw(&mut rng).as_slice() {
                [ParamValue::I32(a), ParamValue::I64(b), ParamValue::Text(c)] => {
                    assert!((5..=7).contains(a) && (10..=12).contains(b) && c == "x");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(Sampler::new(&[Draw::Uniform { lo: 1, hi: 70000 }], &[Type::INT2]).is_err());
        assert!(Sampler::new(&draws, &[Type::INT4]).is_err());
    }
}
