//! The shape a command must have before its fields are read: a map with named fields, each of
//! the type `docs/clients.md` documents. MessagePack accepts more than that (positional arrays
//! for structs, integer keys, binary strings) and serde's refusals speak of markers and enum
//! variants; this check refuses everything else first, in our words, naming the field.

/// What a value is, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Nil,
    Bool,
    UInt,
    NegInt,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Nil => "nil",
            Kind::Bool => "a boolean",
            Kind::UInt => "an integer",
            Kind::NegInt => "a negative integer",
            Kind::Float => "a float",
            Kind::Str => "a string",
            Kind::Bin => "binary data",
            Kind::Array => "an array",
            Kind::Map => "a map",
            Kind::Ext => "a MessagePack extension",
        }
    }
}

/// The fields of a command, for the message that names an unknown one.
const FIELDS: &str = "op, account, cid, oid, side, type, tif, price, qty, stop_price, \
                      display_qty, expire_at, stp, cancel_orders, spec, commands";

/// What to do with a field's value once its kind is accepted.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Then {
    Done,
    /// `spec`: a map, read by the spec's own rules.
    SkipMap,
    /// `commands`: each entry a command.
    Commands,
}

/// The rule of one field: its kind accepted (and what follows), or why not.
pub(super) fn field(name: &str, kind: Kind) -> Result<Then, String> {
    if kind == Kind::Nil {
        return Ok(Then::Done);
    }
    let ok = match name {
        "op" | "account" | "cid" | "side" | "type" | "tif" | "stp" => kind == Kind::Str,
        "price" | "qty" | "stop_price" | "display_qty" => {
            if kind == Kind::Bin {
                return Err(format!(
                    "{name} is binary data; send the decimal as a string, such as \"65000.50\""
                ));
            }
            // A float or a boolean is refused by the field's own rule, which says why (and
            // the refusal reaches the account named beside it).
            matches!(
                kind,
                Kind::Str | Kind::UInt | Kind::NegInt | Kind::Float | Kind::Bool
            )
        }
        "oid" | "expire_at" | "ts" | "seq" => kind == Kind::UInt,
        "cancel_orders" => kind == Kind::Bool,
        "spec" => {
            return if kind == Kind::Map {
                Ok(Then::SkipMap)
            } else {
                Err(format!(
                    "spec must be a map of a market spec's fields, not {}",
                    kind.name()
                ))
            };
        }
        "commands" => {
            return if kind == Kind::Array {
                Ok(Then::Commands)
            } else {
                Err(format!(
                    "commands must be an array of commands (maps), not {}",
                    kind.name()
                ))
            };
        }
        _ => {
            return Err(format!(
                "unknown field {name:?}: a command's fields are {FIELDS}"
            ));
        }
    };
    if ok {
        return Ok(Then::Done);
    }
    let wanted = match name {
        "price" | "qty" | "stop_price" | "display_qty" => {
            "a decimal string such as \"65000.50\" (or an integer)"
        }
        "oid" | "expire_at" | "ts" | "seq" => "an unsigned integer",
        "cancel_orders" => "true or false",
        _ => "a string",
    };
    Err(format!("{name} must be {wanted}, not {}", kind.name()))
}

fn not_a_map(kind: Kind) -> String {
    format!(
        "a command must be a map with named fields (op, side, price, ...), not {}{}",
        kind.name(),
        if kind == Kind::Array {
            ": positional arrays are not accepted; encode commands as maps (rmp_serde::to_vec_named, msgpack.packb of a dict)"
        } else {
            ""
        }
    )
}

/// Most levels of nesting looked into (a batch of commands holding a spec is 4).
const DEPTH_MAX: usize = 8;

/// Checks a MessagePack message: one command map (or a batch), every key a string, every
/// value of its field's kind, nothing after it.
pub(super) fn check_msgpack(bytes: &[u8]) -> Result<(), String> {
    let mut r = Reader { b: bytes, i: 0 };
    let head = r.head()?;
    r.command(head, 0)?;
    if r.i != bytes.len() {
        return Err(format!(
            "{} bytes follow the command; send one MessagePack map per message (a batch is one map with commands)",
            bytes.len() - r.i
        ));
    }
    Ok(())
}

/// Checks a JSON message the same way.
pub(super) fn check_json(value: &serde_json::Value) -> Result<(), String> {
    json_command(value, 0)
}

fn json_kind(v: &serde_json::Value) -> Kind {
    use serde_json::Value;
    match v {
        Value::Null => Kind::Nil,
        Value::Bool(_) => Kind::Bool,
        Value::Number(n) if n.is_u64() => Kind::UInt,
        Value::Number(n) if n.is_i64() => Kind::NegInt,
        Value::Number(_) => Kind::Float,
        Value::String(_) => Kind::Str,
        Value::Array(_) => Kind::Array,
        Value::Object(_) => Kind::Map,
    }
}

fn json_command(v: &serde_json::Value, depth: usize) -> Result<(), String> {
    let serde_json::Value::Object(map) = v else {
        return Err(not_a_map(json_kind(v)));
    };
    for (name, value) in map {
        if field(name, json_kind(value))? == Then::Commands {
            if depth >= DEPTH_MAX {
                return Err("commands are nested too deeply".into());
            }
            for c in value.as_array().into_iter().flatten() {
                json_command(c, depth + 1)?;
            }
        }
    }
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

/// A value's header: its kind, its entries (array, map), its bytes (string).
struct Head<'a> {
    kind: Kind,
    count: usize,
    text: &'a [u8],
}

const CUT: &str = "the MessagePack data ends in the middle of a value";

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.i.checked_add(n).filter(|&e| e <= self.b.len());
        let end = end.ok_or_else(|| CUT.to_string())?;
        let out = &self.b[self.i..end];
        self.i = end;
        Ok(out)
    }

    fn len(&mut self, bytes: usize) -> Result<usize, String> {
        let raw = self.take(bytes)?;
        Ok(raw.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)))
    }

    /// The next value's header; a scalar, string, binary or extension is consumed whole, an
    /// array or map only its header.
    fn head(&mut self) -> Result<Head<'a>, String> {
        let m = self.take(1)?[0];
        let container = |kind, count| {
            Ok(Head {
                kind,
                count,
                text: &[],
            })
        };
        let (kind, skip) = match m {
            0x00..=0x7f => (Kind::UInt, 0),
            0x80..=0x8f => return container(Kind::Map, usize::from(m & 0x0f)),
            0x90..=0x9f => return container(Kind::Array, usize::from(m & 0x0f)),
            0xa0..=0xbf => (Kind::Str, usize::from(m & 0x1f)),
            0xc0 => (Kind::Nil, 0),
            0xc1 => return Err("0xc1 is not a MessagePack marker".into()),
            0xc2 | 0xc3 => (Kind::Bool, 0),
            0xc4 => (Kind::Bin, self.len(1)?),
            0xc5 => (Kind::Bin, self.len(2)?),
            0xc6 => (Kind::Bin, self.len(4)?),
            0xc7 => (Kind::Ext, self.len(1)? + 1),
            0xc8 => (Kind::Ext, self.len(2)? + 1),
            0xc9 => (Kind::Ext, self.len(4)? + 1),
            0xca => (Kind::Float, 4),
            0xcb => (Kind::Float, 8),
            0xcc => (Kind::UInt, 1),
            0xcd => (Kind::UInt, 2),
            0xce => (Kind::UInt, 4),
            0xcf => (Kind::UInt, 8),
            0xd0 => (Kind::NegInt, 1),
            0xd1 => (Kind::NegInt, 2),
            0xd2 => (Kind::NegInt, 4),
            0xd3 => (Kind::NegInt, 8),
            0xd4 => (Kind::Ext, 2),
            0xd5 => (Kind::Ext, 3),
            0xd6 => (Kind::Ext, 5),
            0xd7 => (Kind::Ext, 9),
            0xd8 => (Kind::Ext, 17),
            0xd9 => (Kind::Str, self.len(1)?),
            0xda => (Kind::Str, self.len(2)?),
            0xdb => (Kind::Str, self.len(4)?),
            0xdc => return container(Kind::Array, self.len(2)?),
            0xdd => return container(Kind::Array, self.len(4)?),
            0xde => return container(Kind::Map, self.len(2)?),
            0xdf => return container(Kind::Map, self.len(4)?),
            0xe0..=0xff => (Kind::NegInt, 0),
        };
        let data = self.take(skip)?;
        Ok(Head {
            kind,
            count: 0,
            text: if kind == Kind::Str { data } else { &[] },
        })
    }

    /// Skips the contents of an array or map whose header was read.
    fn skip(&mut self, head: &Head<'a>, depth: usize) -> Result<(), String> {
        if depth > DEPTH_MAX {
            return Err("the message is nested too deeply".into());
        }
        let values = match head.kind {
            Kind::Array => head.count,
            Kind::Map => head.count.saturating_mul(2),
            _ => return Ok(()),
        };
        for _ in 0..values {
            let inner = self.head()?;
            self.skip(&inner, depth + 1)?;
        }
        Ok(())
    }

    /// Checks one command whose header was read.
    fn command(&mut self, head: Head<'a>, depth: usize) -> Result<(), String> {
        if head.kind != Kind::Map {
            return Err(not_a_map(head.kind));
        }
        for entry in 0..head.count {
            let key = self.head()?;
            if key.kind != Kind::Str {
                return Err(format!(
                    "field names must be strings; the key of entry {} is {}",
                    entry + 1,
                    key.kind.name()
                ));
            }
            let name = std::str::from_utf8(key.text)
                .map_err(|_| format!("the name of field {} is not UTF-8", entry + 1))?;
            let value = self.head()?;
            match field(name, value.kind)? {
                Then::Done => {}
                Then::SkipMap => self.skip(&value, depth + 1)?,
                Then::Commands => {
                    if depth >= DEPTH_MAX {
                        return Err("commands are nested too deeply".into());
                    }
                    for _ in 0..value.count {
                        let inner = self.head()?;
                        self.command(inner, depth + 1)?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn named(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(v).expect("encodes")
    }

    #[test]
    fn maps_with_named_fields_of_their_kinds_pass() {
        let order = json!({"op": "new", "account": "a", "cid": "c-1", "side": "buy", "type": "limit",
            "price": "65000.50", "qty": 3, "expire_at": 17, "cancel_orders": null});
        check_msgpack(&named(&order)).expect("a documented command");
        check_json(&order).expect("the same in JSON");
        let batch = json!({"op": "batch", "commands": [order, {"op": "cancel", "cid": "c-1"}]});
        check_msgpack(&named(&batch)).expect("a batch");
        let spec =
            json!({"op": "update_spec", "spec": {"symbol": "X", "price_decimals": 2, "tags": [1]}});
        check_msgpack(&named(&spec)).expect("a spec map is read by the spec's rules");
    }

    #[test]
    fn everything_else_is_refused_naming_the_field() {
        // A positional array (rmp_serde::to_vec of a struct).
        let positional = rmp_serde::to_vec(&("new", "a", "c")).expect("encodes");
        let e = check_msgpack(&positional).expect_err("positional");
        assert!(e.contains("positional arrays are not accepted"), "{e}");
        // An integer key.
        let mut int_key = vec![0x81, 0x01];
        int_key.extend(named(&json!("new")));
        let e = check_msgpack(&int_key).expect_err("integer key");
        assert!(
            e.contains("field names must be strings") && e.contains("an integer"),
            "{e}"
        );
        // A binary price.
        let mut bin = vec![0x81, 0xa5];
        bin.extend(b"price");
        bin.extend([0xc4, 0x03]);
        bin.extend(b"1.5");
        let e = check_msgpack(&bin).expect_err("binary");
        assert!(e.starts_with("price is binary data"), "{e}");
        // A string where an integer goes, and the reverse.
        let e = check_msgpack(&named(&json!({"oid": "12"}))).expect_err("string oid");
        assert_eq!(e, "oid must be an unsigned integer, not a string");
        let e = check_json(&json!({"side": 1})).expect_err("integer side");
        assert_eq!(e, "side must be a string, not an integer");
        let e = check_msgpack(&named(&json!({"price": [1, 2]}))).expect_err("array price");
        assert!(e.starts_with("price must be a decimal string"), "{e}");
        let e = check_msgpack(&named(&json!({"colour": "red"}))).expect_err("unknown");
        assert!(e.starts_with("unknown field \"colour\""), "{e}");
        let e = check_msgpack(&named(&json!({"commands": [[1]]}))).expect_err("array in batch");
        assert!(e.contains("not an array"), "{e}");
        // Cut short, trailing bytes, nonsense.
        let whole = named(&json!({"op": "new", "cid": "abc"}));
        for cut in 1..whole.len() {
            assert!(check_msgpack(&whole[..cut]).is_err(), "cut at {cut}");
        }
        let mut more = whole.clone();
        more.push(0x01);
        assert!(
            check_msgpack(&more)
                .expect_err("trailing")
                .contains("follow the command")
        );
        assert!(check_msgpack(&[0xc1]).is_err());
        assert!(
            check_msgpack(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err(),
            "a huge map header with nothing in it"
        );
    }
}
