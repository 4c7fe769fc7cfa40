// End-to-end: nodemailer through the proxy, configured as NocoBase configures it
// (host, port, secure, auth: {user, pass}; `pool: true` as its email
// notifications use it). Used by tests/e2e/run.py. The proxy's CA is trusted the way
// a NocoBase container trusts it: NODE_EXTRA_CA_CERTS in the environment, never a
// `tls` option here, and certificate verification stays on.
//
//   node tests/e2e/nodemailer_e2e.mjs '<json>'
//
// Options: host, port, secure (false: plain, upgraded by STARTTLS when the server
// offers it; true: implicit TLS, NocoBase's default on port 465), user, pass, pool
// (bool), maxConnections (5), count (1),
// from (user), to ([user]), bcc (none), runId, outDir (each message as the server should store
// it is written to OUTDIR/<index>.eml), attachments ([{index, size, filename, text}]:
// message `index` gets an attachment of `size` bytes, random binary or, with `text`,
// non-ASCII text), verifyOnly (log in only: transporter.verify()), timeoutMs (60000
// per socket phase), overallTimeoutMs (240000).
//
// Prints one JSON line:
//   {"ok":true,"sent":[{index,messageId,subject,response,accepted,rejected,size,sha256,file}],
//    "poolResources":N,"secureConnections":N,"starttlsUpgrades":N}
//   {"ok":true,"verified":true,"secureConnections":N,"starttlsUpgrades":N}
// secureConnections counts connections that were TLS from the first byte,
// starttlsUpgrades the plain ones nodemailer upgraded (from its own log lines).
//   {"ok":false,message,code,responseCode,response,command,sent,errors}  (exit status 1)
//
// What the server should store is what nodemailer streams into DATA, with the
// DATA encoder's line-ending normalisation applied (bare CR or LF become CRLF, and
// a message not ending in CRLF gets one): the 'stream' plugin below taps the very
// stream the SMTP transport sends. Dot-stuffing is undone by the server, so it is
// not applied here.

import { createHash, randomBytes } from 'node:crypto';
import { createRequire } from 'node:module';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Transform, pipeline } from 'node:stream';

const require = createRequire(new URL('../node/package.json', import.meta.url));
const nodemailer = require('nodemailer');

let finished = false;
function emit(obj, code) {
    if (finished) {
        return;
    }
    finished = true;
    process.stdout.write(JSON.stringify(obj) + '\n', () => process.exit(code));
}

function errorReport(err) {
    return {
        message: err && err.message ? err.message : String(err),
        code: err && err.code !== undefined ? err.code : null,
        responseCode: err && err.responseCode !== undefined ? err.responseCode : null,
        response: err && err.response !== undefined ? err.response : null,
        command: err && err.command !== undefined ? err.command : null
    };
}

function fail(err, extra) {
    emit({ ok: false, ...errorReport(err), ...(extra || {}) }, 1);
}

process.on('uncaughtException', err => fail(err));
process.on('unhandledRejection', err => fail(err));

const opts = JSON.parse(process.argv[2] || '{}');
const overall = setTimeout(() => {
    const err = new Error(`nodemailer_e2e.mjs gave up after ${opts.overallTimeoutMs || 240000} ms`);
    err.code = 'ETIMEDOUT';
    fail(err);
}, opts.overallTimeoutMs || 240000);
overall.unref();

// Normalises line endings as smtp-connection's DataStream does on the wire.
function asStored(buf) {
    const out = [];
    let last = 0;
    for (let i = 0; i < buf.length; i++) {
        const byte = buf[i];
        const prev = i ? buf[i - 1] : -1;
        if (prev === 0x0d && byte !== 0x0a) {
            out.push(buf.subarray(last, i), Buffer.from('\n'));
            last = i;
        } else if (byte === 0x0a && prev !== 0x0d) {
            out.push(buf.subarray(last, i), Buffer.from('\r'));
            last = i;
        }
    }
    out.push(buf.subarray(last));
    let all = Buffer.concat(out);
    if (all.length && all[all.length - 1] === 0x0d) {
        all = Buffer.concat([all, Buffer.from('\n')]);
    } else if (!(all.length >= 2 && all[all.length - 2] === 0x0d && all[all.length - 1] === 0x0a)) {
        all = Buffer.concat([all, Buffer.from('\r\n')]);
    }
    return all;
}

class Tap extends Transform {
    constructor(onDone) {
        super();
        this.chunks = [];
        this.onDone = onDone;
    }
    _transform(chunk, enc, done) {
        if (typeof chunk === 'string') {
            chunk = Buffer.from(chunk, enc);
        }
        this.chunks.push(chunk);
        this.push(chunk);
        done();
    }
    _flush(done) {
        this.onDone(asStored(Buffer.concat(this.chunks)));
        done();
    }
}

let poolResources = 0;
let secureConnections = 0;
let starttlsUpgrades = 0;
const countingLogger = {};
for (const level of ['trace', 'debug', 'info', 'warn', 'error', 'fatal']) {
    countingLogger[level] = (...args) => {
        const text = args.filter(a => typeof a === 'string').join(' ');
        if (text.includes('Created new pool resource')) {
            poolResources++;
        }
        if (text.includes('established to') && text.includes('Secure connection')) {
            secureConnections++;
        }
        if (text.includes('Connection upgraded with STARTTLS')) {
            starttlsUpgrades++;
        }
        if (opts.debug && level !== 'trace') {
            console.error(`[nodemailer ${level}]`, ...args.filter(a => typeof a !== 'object'));
        }
    };
}

const timeout = opts.timeoutMs || 60000;
const transportOptions = {
    host: opts.host || '127.0.0.1',
    port: opts.port,
    secure: !!opts.secure,
    auth: { user: opts.user, pass: opts.pass },
    connectionTimeout: timeout,
    greetingTimeout: timeout,
    socketTimeout: timeout,
    logger: countingLogger
};
if (opts.pool) {
    transportOptions.pool = true;
    transportOptions.maxConnections = opts.maxConnections ?? 5;
}
const transporter = nodemailer.createTransport(transportOptions);

const stored = new Map();
transporter.use('stream', (mail, done) => {
    const messageId = mail.message.messageId();
    mail.message.processFunc(input => {
        const tap = new Tap(buf => stored.set(messageId, buf));
        return pipeline(input, tap, () => {});
    });
    done();
});

if (opts.verifyOnly) {
    try {
        await transporter.verify();
        transporter.close();
        emit({ ok: true, verified: true, secureConnections, starttlsUpgrades }, 0);
    } catch (err) {
        transporter.close();
        fail(err, { secureConnections, starttlsUpgrades });
    }
} else {
    const count = opts.count ?? 1;
    const runId = opts.runId || randomBytes(6).toString('hex');
    const from = opts.from || opts.user;
    const to = opts.to || [opts.user];
    const attachments = new Map((opts.attachments || []).map(a => [a.index, a]));

    const mails = [];
    for (let i = 0; i < count; i++) {
        const mail = {
            from: { name: 'Zoë Ünïcode — NocoBase', address: from },
            to,
            messageId: `<e2e-${runId}-${i}@e2e.example.test>`,
            subject: `e2e ${runId} #${i} Grüße aus Köln ✓ 日本語 📨`,
            headers: { 'X-E2E-Run': runId, 'X-Test-Unicode': 'Ünïcödé ✓ ÆØÅ' },
            text: `Hello from nodemailer, message ${i}: Grüße, 日本語, emoji 📨.\r\n.a line with a leading dot\r\n..\r\n.\r\nend\r\n`,
            html: `<p>Message <b>${i}</b> — Grüße ✓</p>\r\n`
        };
        if (opts.bcc) {
            mail.bcc = opts.bcc;
        }
        const spec = attachments.get(i);
        if (spec) {
            const content = spec.text
                ? Buffer.from('Prüfbericht — Zeile mit Umlauten äöü ß ✓\r\n'.repeat(Math.ceil(spec.size / 48))).subarray(0, spec.size)
                : randomBytes(spec.size);
            mail.attachments = [
                {
                    filename: spec.filename || 'random.bin',
                    content,
                    contentType: spec.text ? 'text/plain; charset=utf-8' : 'application/octet-stream'
                }
            ];
        }
        mails.push(mail);
    }

    const results = await Promise.allSettled(mails.map(mail => transporter.sendMail(mail)));
    transporter.close();

    const sent = [];
    const errors = [];
    results.forEach((result, index) => {
        if (result.status === 'fulfilled') {
            const info = result.value;
            const buf = stored.get(info.messageId);
            const entry = {
                index,
                messageId: info.messageId,
                subject: mails[index].subject,
                response: info.response,
                accepted: info.accepted,
                rejected: info.rejected,
                size: buf ? buf.length : null,
                sha256: buf ? createHash('sha256').update(buf).digest('hex') : null
            };
            if (buf && opts.outDir) {
                entry.file = join(opts.outDir, `${index}.eml`);
                writeFileSync(entry.file, buf);
            }
            sent.push(entry);
        } else {
            errors.push({ index, ...errorReport(result.reason) });
        }
    });
    if (errors.length) {
        const first = results.find(r => r.status === 'rejected').reason;
        fail(first, { sent, errors, poolResources, secureConnections, starttlsUpgrades });
    } else {
        emit({ ok: true, sent, poolResources, secureConnections, starttlsUpgrades }, 0);
    }
}
