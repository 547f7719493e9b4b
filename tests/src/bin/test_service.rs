//! `cbus-test-service`: a D-Bus service with properties, methods and signals of many types, for
//! the integration tests. Serves `/org/cbus/Test` (interfaces `org.cbus.Test1` and
//! `org.cbus.Test2`, which both have `Ping`, to test ambiguity) and a child `/org/cbus/Test/child1`.
//! Prints `READY` once it owns its name.

use std::collections::HashMap;

use zbus::object_server::SignalEmitter;
use zbus::{fdo, interface};
use zvariant::{ObjectPath, OwnedObjectPath, OwnedValue, Signature, Value};

struct Test1 {
    byte: u8,
    boolean: bool,
    int16: i16,
    uint16: u16,
    int32: i32,
    uint32: u32,
    int64: i64,
    uint64: u64,
    double: f64,
    string: String,
    object_path: OwnedObjectPath,
    signature: String,
    bytes: Vec<u8>,
    strings: Vec<String>,
    dict: HashMap<String, OwnedValue>,
    int_dict: HashMap<u32, i32>,
    structure: (String, i32, bool),
    variant: OwnedValue,
}

#[interface(name = "org.cbus.Test1")]
impl Test1 {
    #[zbus(property)]
    fn version(&self) -> &str {
        "1.0"
    }
    #[zbus(property)]
    fn byte(&self) -> u8 {
        self.byte
    }
    #[zbus(property)]
    fn set_byte(&mut self, v: u8) {
        self.byte = v;
    }
    #[zbus(property)]
    fn bool(&self) -> bool {
        self.boolean
    }
    #[zbus(property)]
    fn set_bool(&mut self, v: bool) {
        self.boolean = v;
    }
    #[zbus(property)]
    fn int16(&self) -> i16 {
        self.int16
    }
    #[zbus(property)]
    fn set_int16(&mut self, v: i16) {
        self.int16 = v;
    }
    #[zbus(property)]
    fn u_int16(&self) -> u16 {
        self.uint16
    }
    #[zbus(property)]
    fn set_u_int16(&mut self, v: u16) {
        self.uint16 = v;
    }
    #[zbus(property)]
    fn int32(&self) -> i32 {
        self.int32
    }
    #[zbus(property)]
    fn set_int32(&mut self, v: i32) {
        self.int32 = v;
    }
    #[zbus(property, name = "UInt32")]
    fn uint32(&self) -> u32 {
        self.uint32
    }
    #[zbus(property, name = "UInt32")]
    fn set_uint32(&mut self, v: u32) {
        self.uint32 = v;
    }
    #[zbus(property)]
    fn int64(&self) -> i64 {
        self.int64
    }
    #[zbus(property)]
    fn set_int64(&mut self, v: i64) {
        self.int64 = v;
    }
    #[zbus(property, name = "UInt64")]
    fn uint64(&self) -> u64 {
        self.uint64
    }
    #[zbus(property, name = "UInt64")]
    fn set_uint64(&mut self, v: u64) {
        self.uint64 = v;
    }
    #[zbus(property)]
    fn double(&self) -> f64 {
        self.double
    }
    #[zbus(property)]
    fn set_double(&mut self, v: f64) {
        self.double = v;
    }
    #[zbus(property)]
    fn string(&self) -> String {
        self.string.clone()
    }
    #[zbus(property)]
    fn set_string(&mut self, v: String) {
        self.string = v;
    }
    #[zbus(property)]
    fn object_path(&self) -> OwnedObjectPath {
        self.object_path.clone()
    }
    #[zbus(property)]
    fn set_object_path(&mut self, v: OwnedObjectPath) {
        self.object_path = v;
    }
    #[zbus(property)]
    fn signature(&self) -> Signature {
        self.signature.parse().unwrap_or(Signature::Unit)
    }
    #[zbus(property)]
    fn bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }
    #[zbus(property)]
    fn set_bytes(&mut self, v: Vec<u8>) {
        self.bytes = v;
    }
    #[zbus(property)]
    fn strings(&self) -> Vec<String> {
        self.strings.clone()
    }
    #[zbus(property)]
    fn set_strings(&mut self, v: Vec<String>) {
        self.strings = v;
    }
    #[zbus(property)]
    fn dict(&self) -> HashMap<String, OwnedValue> {
        self.dict
            .iter()
            .filter_map(|(k, v)| v.try_clone().ok().map(|v| (k.clone(), v)))
            .collect()
    }
    #[zbus(property)]
    fn set_dict(&mut self, v: HashMap<String, OwnedValue>) {
        self.dict = v;
    }
    #[zbus(property)]
    fn int_dict(&self) -> HashMap<u32, i32> {
        self.int_dict.clone()
    }
    #[zbus(property)]
    fn set_int_dict(&mut self, v: HashMap<u32, i32>) {
        self.int_dict = v;
    }
    #[zbus(property, name = "Struct")]
    fn structure(&self) -> (String, i32, bool) {
        self.structure.clone()
    }
    #[zbus(property, name = "Struct")]
    fn set_structure(&mut self, v: (String, i32, bool)) {
        self.structure = v;
    }
    #[zbus(property)]
    fn variant(&self) -> OwnedValue {
        self.variant
            .try_clone()
            .unwrap_or_else(|_| OwnedValue::from(0u32))
    }
    #[zbus(property)]
    fn set_variant(&mut self, v: OwnedValue) {
        self.variant = v;
    }

    fn echo(&self, v: OwnedValue) -> OwnedValue {
        v
    }

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn echo_all(
        &self,
        y: u8,
        b: bool,
        n: i16,
        q: u16,
        i: i32,
        u: u32,
        x: i64,
        t: u64,
        d: f64,
        s: String,
        o: OwnedObjectPath,
        g: Signature,
        ay: Vec<u8>,
        r#as: Vec<String>,
        dict: HashMap<String, OwnedValue>,
        st: (String, i32, bool),
    ) -> (
        u8,
        bool,
        i16,
        u16,
        i32,
        u32,
        i64,
        u64,
        f64,
        String,
        OwnedObjectPath,
        Signature,
        Vec<u8>,
        Vec<String>,
        HashMap<String, OwnedValue>,
        (String, i32, bool),
    ) {
        (y, b, n, q, i, u, x, t, d, s, o, g, ay, r#as, dict, st)
    }

    fn add(&self, a: i32, b: i32) -> fdo::Result<i32> {
        a.checked_add(b)
            .ok_or_else(|| fdo::Error::InvalidArgs("overflow".into()))
    }

    fn concat(&self, parts: Vec<String>) -> String {
        parts.concat()
    }

    fn fail(&self, message: String) -> Result<(), TestError> {
        Err(TestError::Failed(message))
    }

    async fn sleep(&self, ms: u32) {
        tokio::time::sleep(std::time::Duration::from_millis(u64::from(ms))).await;
    }

    fn no_args(&self) {}

    fn ping(&self) -> &str {
        "pong from Test1"
    }

    async fn emit_signals(
        &self,
        count: u32,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> fdo::Result<()> {
        for n in 0..count {
            Self::tick(&emitter, n, "tick")
                .await
                .map_err(|e| fdo::Error::Failed(e.to_string()))?;
        }
        Ok(())
    }

    async fn emit_one(
        &self,
        text: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> fdo::Result<()> {
        Self::message(&emitter, &text)
            .await
            .map_err(|e| fdo::Error::Failed(e.to_string()))
    }

    #[zbus(signal)]
    async fn tick(emitter: &SignalEmitter<'_>, n: u32, text: &str) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn message(emitter: &SignalEmitter<'_>, text: &str) -> zbus::Result<()>;
}

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.cbus.Test.Error")]
enum TestError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Failed(String),
}

struct Test2;

#[interface(name = "org.cbus.Test2")]
impl Test2 {
    fn ping(&self) -> &str {
        "pong from Test2"
    }
}

struct Child;

#[interface(name = "org.cbus.Child1")]
impl Child {
    #[zbus(property)]
    fn name(&self) -> &str {
        "child1"
    }
}

fn initial() -> Test1 {
    let mut dict = HashMap::new();
    dict.insert("answer".to_owned(), OwnedValue::from(42u32));
    dict.insert(
        "name".to_owned(),
        OwnedValue::try_from(Value::from("cbus")).unwrap_or_else(|_| OwnedValue::from(0u32)),
    );
    Test1 {
        byte: 7,
        boolean: true,
        int16: -16,
        uint16: 16,
        int32: -32,
        uint32: 32,
        int64: -9_007_199_254_740_993,
        uint64: 18_446_744_073_709_551_615,
        double: 2.5,
        string: "hello".into(),
        object_path: ObjectPath::from_static_str_unchecked("/org/cbus/Test").into(),
        signature: "a{sv}".into(),
        bytes: vec![0, 1, 2, 255],
        strings: vec!["a".into(), "b".into()],
        dict,
        int_dict: HashMap::from([(1, -1), (20, 2)]),
        structure: ("s".into(), 1, true),
        variant: OwnedValue::from(3u32),
    }
}

/// Emitter mode for the benchmark: `count` `org.cbus.Test1.Tick` signals from `/org/cbus/Test`,
/// split over `connections` bus connections sending at once, each message built before the clock
/// starts so that only sending is timed. Prints `EMITTED <count> <seconds>`.
async fn emit_flood(address: &str, count: u32, connections: u32) -> anyhow::Result<()> {
    let connections = connections.max(1);
    let mut batches = Vec::new();
    for c in 0..connections {
        let conn = zbus::connection::Builder::address(address)?.build().await?;
        let n = count / connections + u32::from(c < count % connections);
        let mut msgs = Vec::with_capacity(n as usize);
        for i in 0..n {
            msgs.push(
                zbus::message::Message::signal("/org/cbus/Test", "org.cbus.Test1", "Tick")?
                    .build(&(i, "tick"))?,
            );
        }
        batches.push((conn, msgs));
    }
    let start = std::time::Instant::now();
    let tasks: Vec<_> = batches
        .into_iter()
        .map(|(conn, msgs)| {
            tokio::spawn(async move {
                for m in &msgs {
                    conn.send(m).await?;
                }
                Ok::<_, zbus::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    println!("EMITTED {count} {:.6}", start.elapsed().as_secs_f64());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut address = None;
    let mut name = "org.cbus.Test".to_owned();
    let mut emit: Option<u32> = None;
    let mut connections = 1u32;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--address" => address = args.next(),
            "--name" => name = args.next().unwrap_or(name),
            "--emit" => emit = Some(args.next().unwrap_or_default().parse()?),
            "--connections" => connections = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!(
                "unknown argument {other}; usage: --address ADDR [--name NAME] [--emit COUNT [--connections K]]"
            ),
        }
    }
    if let Some(count) = emit {
        let address = address.ok_or_else(|| anyhow::anyhow!("--emit needs --address"))?;
        return emit_flood(&address, count, connections).await;
    }
    let builder = match address {
        Some(a) => zbus::connection::Builder::address(a.as_str())?,
        None => zbus::connection::Builder::session()?,
    };
    let _conn = builder
        .name(name.as_str())?
        .serve_at("/org/cbus/Test", initial())?
        .serve_at("/org/cbus/Test", Test2)?
        .serve_at("/org/cbus/Test/child1", Child)?
        .build()
        .await?;
    println!("READY");
    std::future::pending::<()>().await;
    Ok(())
}
