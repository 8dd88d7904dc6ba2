// An inspection-station OPC UA server on node-opcua: an implementation independent of
// asyncua, used by the interop tests of the gateway's OPC UA source.
//
// Usage: node server.js --port 4841 --pki DIR [--user name:password] [--items N]
//                       [--period-ms 100] [--result-period-ms 300] [--strict] [--handshake]
//                       [--journal FILE]
// --strict: unknown client certificates are rejected (kept in DIR/rejected) until an
// administrator moves them to DIR/trusted/certs, as on a real plant server.
//
// Prints one JSON line on stdout when listening:
//   {"endpoint": "...", "namespace": "...", "ns": 1, "server_cert_der_b64": "..."}
// Address space (own namespace, index 1), under /Objects/1:Station7:
//   Temperature (Double, historized; 20 + n/100 at every period), SpindleSpeed (Double),
//   PartCounter (UInt32), LotId, Serial, Result (String), Measured (Double),
//   ResultReady (Boolean, writable), Sensor0000.. (Double, optional load items).
// Every result period: LotId (new lot every 5 parts), Serial, Result (every tenth part
// "fail"), Measured, then ResultReady=true; half a period later ResultReady=false (with
// --handshake it stays true until a client writes false; only then comes the next part).
// --journal FILE: append one JSON line per part ({"k":"part",...}), per acknowledged part
// ({"k":"acked","part":n}: a client wrote ResultReady=false) and per Temperature sample
// ({"k":"sample","ts":...,"value":...}), written synchronously so a kill -9 keeps them; at
// start the station resumes from the file as one that keeps its state would: numbering
// goes on, and a part raised but never acknowledged is raised again with the same values.
"use strict";

const fs = require("fs");

const {
    OPCUAServer, OPCUACertificateManager, SecurityPolicy, MessageSecurityMode, DataType,
    Variant, StatusCodes, AccessLevelFlag, makeAccessLevelFlag,
} = require("node-opcua");

function arg(name, fallback) {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const port = parseInt(arg("port", "4841"), 10);
const pki = arg("pki", "./pki");
const user = arg("user", null);
const strict = process.argv.includes("--strict");  // do not trust unknown client certs
// --handshake: the next part waits until a client wrote ResultReady=false (the ack)
const handshake = process.argv.includes("--handshake");
const items = parseInt(arg("items", "0"), 10);
const periodMs = parseFloat(arg("period-ms", "100"));
const resultPeriodMs = parseFloat(arg("result-period-ms", "300"));
const NAME = "Station7";
const journalFile = arg("journal", null);

function journal(rec) {
    if (journalFile) {
        fs.appendFileSync(journalFile, JSON.stringify(rec) + "\n");
    }
}

// What an earlier run of this station wrote: the last part, whether it was acknowledged,
// the last Temperature step.
function resume() {
    const past = { last: null, acked: new Set(), n: 0 };
    if (!journalFile || !fs.existsSync(journalFile)) {
        return past;
    }
    for (const line of fs.readFileSync(journalFile, "utf8").split("\n")) {
        let rec;
        try {
            rec = JSON.parse(line);
        } catch (err) {
            continue;  // empty, or cut by a kill -9
        }
        if (rec.k === "part") {
            past.last = rec;
        } else if (rec.k === "acked") {
            past.acked.add(rec.part);
        } else if (rec.k === "sample") {
            past.n = Math.max(past.n, Math.round((rec.value - 20.0) * 100));
        }
    }
    return past;
}

async function main() {
    const certificateManager = new OPCUACertificateManager({
        rootFolder: pki,
        automaticallyAcceptUnknownCertificate: !strict,
    });
    await certificateManager.initialize();
    const users = {};
    if (user) {
        const [name, password] = user.split(":");
        users[name] = password;
    }
    const server = new OPCUAServer({
        port,
        host: "127.0.0.1",
        hostname: "127.0.0.1",
        serverCertificateManager: certificateManager,
        securityPolicies: [
            SecurityPolicy.None, SecurityPolicy.Basic256Sha256,
            SecurityPolicy.Aes128_Sha256_RsaOaep, SecurityPolicy.Aes256_Sha256_RsaPss,
        ],
        securityModes: [
            MessageSecurityMode.None, MessageSecurityMode.Sign,
            MessageSecurityMode.SignAndEncrypt,
        ],
        allowAnonymous: !user,
        userManager: user ? { isValidUser: (u, p) => users[u] === p } : undefined,
        serverInfo: { applicationUri: `urn:edge-gateway:node-station:${NAME}` },
    });
    await server.initialize();

    const addressSpace = server.engine.addressSpace;
    const namespace = addressSpace.getOwnNamespace();
    const station = namespace.addObject({
        organizedBy: addressSpace.rootFolder.objects,
        browseName: NAME,
        nodeId: `s=${NAME}`,
    });
    const readWrite = makeAccessLevelFlag("CurrentRead | CurrentWrite");
    function variable(name, dataType, value, writable) {
        return namespace.addVariable({
            componentOf: station,
            browseName: name,
            nodeId: `s=${NAME}.${name}`,
            dataType,
            value: new Variant({ dataType, value }),
            accessLevel: writable ? readWrite : AccessLevelFlag.CurrentRead,
            userAccessLevel: writable ? readWrite : AccessLevelFlag.CurrentRead,
            minimumSamplingInterval: 0,
        });
    }
    const v = {
        Temperature: variable("Temperature", DataType.Double, 20.0),
        SpindleSpeed: variable("SpindleSpeed", DataType.Double, 12000.0),
        PartCounter: variable("PartCounter", DataType.UInt32, 0),
        LotId: variable("LotId", DataType.String, "LNODE-0001"),
        Serial: variable("Serial", DataType.String, ""),
        Result: variable("Result", DataType.String, ""),
        Measured: variable("Measured", DataType.Double, 0.0),
        ResultReady: variable("ResultReady", DataType.Boolean, false, true),
    };
    const past = resume();
    let n = past.n;
    function tick() {
        n += 1;
        const value = 20.0 + n / 100;
        const now = new Date();
        v.Temperature.setValueFromSource(new Variant({ dataType: DataType.Double, value }),
            StatusCodes.Good, now);
        journal({ k: "sample", ts: now.toISOString(), value });
        set(v.SpindleSpeed, DataType.Double, 12000.0 + (n % 7));
    }
    if (journalFile) {
        // the history starts with the current value: make it one the journal has
        journal({ k: "start", at: new Date().toISOString(), history: "memory" });
        tick();
    }
    addressSpace.installHistoricalDataNode(v.Temperature, { maxOnlineValues: 100000 });
    const sensors = [];
    for (let i = 0; i < items; i++) {
        sensors.push(variable(`Sensor${String(i).padStart(4, "0")}`, DataType.Double, 0.0));
    }

    function set(node, dataType, value) {
        node.setValueFromSource(new Variant({ dataType, value }), StatusCodes.Good, new Date());
    }

    setInterval(tick, periodMs);

    let part = past.last ? past.last.part : 0;
    let again = past.last && !past.acked.has(past.last.part) ? past.last : null;
    let raised = null;  // the part waiting for its ack (with --handshake)
    v.ResultReady.on("value_changed", (dv) => {
        if (raised !== null && dv.value.value === false) {
            journal({ k: "acked", part: raised });  // only a client writes false
            raised = null;
        }
    });
    setInterval(() => {
        if (handshake && v.ResultReady.readValue().value.value === true) {
            return;  // the previous result is not acknowledged yet
        }
        let rec = again;
        again = null;
        if (rec === null) {
            part += 1;
            rec = {
                k: "part", part,
                serial: `${NAME}-N${String(part).padStart(6, "0")}`,
                lot: `LNODE-${String(Math.floor((part - 1) / 5) + 1).padStart(4, "0")}`,
                result: part % 10 === 0 ? "fail" : "pass",
                measured: 10.0 + (part % 5) / 100,
            };
            journal(rec);
        }
        set(v.LotId, DataType.String, rec.lot);
        set(v.Serial, DataType.String, rec.serial);
        set(v.Result, DataType.String, rec.result);
        set(v.Measured, DataType.Double, rec.measured);
        set(v.PartCounter, DataType.UInt32, rec.part);
        if (handshake) {
            raised = rec.part;
        }
        set(v.ResultReady, DataType.Boolean, true);
        if (!handshake) {
            setTimeout(() => set(v.ResultReady, DataType.Boolean, false), resultPeriodMs / 2);
        }
    }, resultPeriodMs);

    if (items > 0) {
        let k = 0;
        setInterval(() => {
            k += 1;
            const now = new Date();
            const value = new Variant({ dataType: DataType.Double, value: k });
            for (const s of sensors) {
                s.setValueFromSource(value, StatusCodes.Good, now);
            }
        }, periodMs);
    }

    await server.start();
    const cert = server.getCertificate ? server.getCertificate() : null;
    process.stdout.write(JSON.stringify({
        endpoint: `opc.tcp://127.0.0.1:${port}`,
        namespace: namespace.namespaceUri,
        ns: namespace.index,
        server_cert_der_b64: cert ? Buffer.from(cert).toString("base64") : null,
    }) + "\n");

    const stop = async () => {
        await server.shutdown(100);
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
}

main().catch((err) => {
    process.stderr.write(`node-opcua station failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});
