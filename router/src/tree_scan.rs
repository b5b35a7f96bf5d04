//! `TreeScan`: a generic scan over every node of a parse subtree.
//!
//! The structured walks (`analysis`, `replica`) understand the node types routing cares
//! about; this scan goes through all of them, through the `serde::Serialize` that pg_query
//! derives for each node type, so that no node type can hide a sharded table, a function
//! call or a row lock from them.

use std::fmt;

use serde::ser::{self, Serialize, Serializer};

/// What a parse subtree names anywhere in it.
#[derive(Debug, Default)]
pub(crate) struct TreeScan {
    /// `(schemaname, relname)` of every `RangeVar`.
    pub(crate) relations: Vec<(String, String)>,
    /// The name of every WITH query.
    pub(crate) ctes: Vec<String>,
    /// The name of every function call (`FuncCall`), one string per dotted part as the
    /// parser leaves it: `["pg_catalog", "lower"]`, `["my_func"]`.
    pub(crate) functions: Vec<Vec<String>>,
    /// A row-locking clause: `FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`, `FOR KEY SHARE`.
    pub(crate) locks_rows: bool,
    /// An `INTO` clause: `SELECT ... INTO` creates a table.
    pub(crate) into: bool,
    /// A value that changes between executions although it is no function
    /// call: `CURRENT_TIMESTAMP`, `CURRENT_USER` and the other SQL value
    /// functions, `TABLESAMPLE`.
    pub(crate) varies: bool,
    /// An `INSERT`, `UPDATE`, `DELETE` or `MERGE` statement node (below a SELECT: a
    /// data-modifying WITH query).
    pub(crate) modifies: bool,
    /// The strings met while `capturing`.
    captured: Vec<String>,
    capturing: bool,
}

impl TreeScan {
    /// Adds what `node` and everything below it name. Fails only if the tree cannot be
    /// serialized (the scan stops there, having found part of it), which the caller must
    /// treat as "anything may be in there".
    pub(crate) fn scan<T: Serialize + ?Sized>(&mut self, node: &T) -> Result<(), fmt::Error> {
        node.serialize(self)
    }
}

type ScanResult = std::result::Result<(), fmt::Error>;

macro_rules! ignore_scalars {
    ($($method:ident: $ty:ty),* $(,)?) => {
        $(fn $method(self, _: $ty) -> ScanResult { Ok(()) })*
    };
}

impl<'a> Serializer for &'a mut TreeScan {
    type Ok = ();
    type Error = fmt::Error;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = StructScan<'a>;
    type SerializeStructVariant = Self;

    ignore_scalars!(
        serialize_bool: bool, serialize_i8: i8, serialize_i16: i16, serialize_i32: i32,
        serialize_i64: i64, serialize_u8: u8, serialize_u16: u16, serialize_u32: u32,
        serialize_u64: u64, serialize_f32: f32, serialize_f64: f64, serialize_char: char,
        serialize_bytes: &[u8], serialize_unit_struct: &'static str,
    );

    fn serialize_str(self, value: &str) -> ScanResult {
        if self.capturing {
            self.captured.push(value.to_owned());
        }
        Ok(())
    }

    fn serialize_none(self) -> ScanResult {
        Ok(())
    }

    fn serialize_unit(self) -> ScanResult {
        Ok(())
    }

    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> ScanResult {
        Ok(())
    }

    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> ScanResult {
        value.serialize(self)
    }

    fn serialize_newtype_struct<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        value: &T,
    ) -> ScanResult {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> ScanResult {
        value.serialize(self)
    }

    fn serialize_seq(self, _: Option<usize>) -> std::result::Result<Self, fmt::Error> {
        Ok(self)
    }

    fn serialize_tuple(self, _: usize) -> std::result::Result<Self, fmt::Error> {
        Ok(self)
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> std::result::Result<Self, fmt::Error> {
        Ok(self)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> std::result::Result<Self, fmt::Error> {
        Ok(self)
    }

    fn serialize_map(self, _: Option<usize>) -> std::result::Result<Self, fmt::Error> {
        Ok(self)
    }

    fn serialize_struct(
        self,
        name: &'static str,
        _: usize,
    ) -> std::result::Result<StructScan<'a>, fmt::Error> {
        Ok(StructScan {
            scan: self,
            name,
            schemaname: String::new(),
            relname: String::new(),
            funcname: Vec::new(),
        })
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> std::result::Result<Self, fmt::Error> {
        Ok(self)
    }
}

/// The sequence-like serializer traits all just visit each element.
macro_rules! scan_elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for &mut TreeScan {
            type Ok = ();
            type Error = fmt::Error;

            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> ScanResult {
                value.serialize(&mut **self)
            }

            fn end(self) -> ScanResult {
                Ok(())
            }
        }
    )*};
}

scan_elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for &mut TreeScan {
    type Ok = ();
    type Error = fmt::Error;

    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> ScanResult {
        key.serialize(&mut **self)
    }

    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> ScanResult {
        value.serialize(&mut **self)
    }

    fn end(self) -> ScanResult {
        Ok(())
    }
}

impl ser::SerializeStructVariant for &mut TreeScan {
    type Ok = ();
    type Error = fmt::Error;

    fn serialize_field<T: ?Sized + Serialize>(&mut self, _: &'static str, value: &T) -> ScanResult {
        value.serialize(&mut **self)
    }

    fn end(self) -> ScanResult {
        Ok(())
    }
}

/// One struct of the tree; captures the name fields of `RangeVar`, `CommonTableExpr` and
/// `FuncCall`, and notes the node types `TreeScan` flags.
pub(crate) struct StructScan<'a> {
    scan: &'a mut TreeScan,
    name: &'static str,
    schemaname: String,
    /// The relation name, or the WITH query name.
    relname: String,
    /// The parts of a function name.
    funcname: Vec<String>,
}

impl ser::SerializeStruct for StructScan<'_> {
    type Ok = ();
    type Error = fmt::Error;

    fn serialize_field<T: ?Sized + Serialize>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> ScanResult {
        let captured = matches!(
            (self.name, key),
            ("RangeVar", "schemaname" | "relname")
                | ("CommonTableExpr", "ctename")
                | ("FuncCall", "funcname")
        );
        if !captured {
            return value.serialize(&mut *self.scan);
        }
        // These fields hold only strings (a function name is a list of String nodes), so
        // captures never nest.
        let start = self.scan.captured.len();
        self.scan.capturing = true;
        let result = value.serialize(&mut *self.scan);
        self.scan.capturing = false;
        let mut strings = self.scan.captured.split_off(start);
        match key {
            "funcname" => self.funcname = strings,
            "schemaname" => self.schemaname = strings.pop().unwrap_or_default(),
            _ => self.relname = strings.pop().unwrap_or_default(),
        }
        result
    }

    fn end(self) -> ScanResult {
        let scan = self.scan;
        match self.name {
            "RangeVar" => scan.relations.push((self.schemaname, self.relname)),
            "CommonTableExpr" => scan.ctes.push(self.relname),
            "FuncCall" => scan.functions.push(self.funcname),
            "LockingClause" => scan.locks_rows = true,
            "IntoClause" => scan.into = true,
            "SqlValueFunction" | "RangeTableSample" => scan.varies = true,
            "InsertStmt" | "UpdateStmt" | "DeleteStmt" | "MergeStmt" => scan.modifies = true,
            _ => {}
        }
        Ok(())
    }
}
