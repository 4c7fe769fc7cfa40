// Sends mail with nodemailer the way NocoBase configures it, for the Rust tests.
//
//   node tests/node/nodemailer_send.mjs '<json options>'
//
// Options: {host, port, secure, user, pass?, accessToken?, caFile?, pool,
//           maxConnections? (5), maxMessages?, count? (1), attachmentSize?, to?, cc?, bcc?, from?,
//           verifyOnly?, timeoutMs? (15000, per socket phase), overallTimeoutMs? (180000),
//           debug? (nodemailer's log on stderr)}
//
// With `accessToken` the transport logs in with `auth: {type: 'OAuth2', user, accessToken}`
// (XOAUTH2, for talking to the mock upstream directly); with `pass` it uses
// `auth: {user, pass}` like NocoBase; with neither it sends without authentication.
//
// Prints exactly one line of JSON on stdout:
//   {"ok":true,"sent":[{"index","messageId","response","accepted","rejected",
//                       "sha256OfRaw","sha256OfWire","size","wireSize"}...]}
//   {"ok":true,"verified":true}                                    (verifyOnly)
//   {"ok":false,"message","code","responseCode","response","command",
//    "sent":[...successful ones...],"errors":[...every failure...]}  (exit code 1)
//
// The hashes are taken from the very stream nodemailer sends. A 'stream' plugin adds
// a processFunc to each compiled message; processFuncs run inside
// MimeNode.createReadStream(), the stream the SMTP transport pipes into its DATA
// encoder (smtp-connection's DataStream). The tap passes the bytes through untouched
// and feeds a copy through nodemailer's own DataStream (the same line-ending
// normalisation and dot-stuffing as on the wire; a faithful local copy is used if that
// internal module cannot be imported), then:
//   sha256OfWire = sha256 of the DATA bytes on the wire, dot-stuffed, without the final
//                  ".\r\n" line   (= the mock's ReceivedMessage::raw)
//   sha256OfRaw  = the same with every line-leading dot removed, i.e. the message as
//                  the server stores it (= the mock's ReceivedMessage::data)
// For messages MailComposer builds (CRLF only, ending in CRLF) sha256OfRaw is also the
// sha256 of the generated message itself. No DKIM is configured; a DKIM processFunc
// would come after the tap and change the bytes.

import crypto from 'node:crypto';
import fs from 'node:fs';
import { Transform, pipeline } from 'node:stream';
import nodemailer from 'nodemailer';

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

let opts;
try {
    opts = JSON.parse(process.argv[2] || '{}');
} catch (err) {
    opts = {};
    fail(new Error('bad options JSON: ' + err.message));
}

const overall = setTimeout(() => {
    const err = new Error(`nodemailer_send.mjs gave up after ${opts.overallTimeoutMs || 180000} ms`);
    err.code = 'ETIMEDOUT';
    fail(err);
}, opts.overallTimeoutMs || 180000);
overall.unref();

// nodemailer's own encoder, with a local copy as the fallback.
let DataStream;
try {
    ({ default: DataStream } = await import('./node_modules/nodemailer/dist/esm/smtp-connection/data-stream.js'));
} catch {
    DataStream = class LocalDataStream extends Transform {
        constructor() {
            super();
            this.lastByte = false;
        }
        _transform(chunk, _enc, done) {
            const out = [];
            let lastPos = 0;
            for (let i = 0; i < chunk.length; i++) {
                const byte = chunk[i];
                const prev = i ? chunk[i - 1] : this.lastByte;
                let insert = null;
                if (prev === 0x0d && byte !== 0x0a) {
                    insert = byte === 0x2e ? '\n.' : '\n';
                } else if (byte === 0x0a && prev !== 0x0d) {
                    insert = '\r';
                } else if (byte === 0x2e && (prev === 0x0a || prev === false)) {
                    insert = '.';
                }
                if (insert !== null) {
                    out.push(chunk.subarray(lastPos, i), Buffer.from(insert));
                    lastPos = i;
                }
            }
            out.push(chunk.subarray(lastPos));
            if (chunk.length) {
                this.lastByte = chunk[chunk.length - 1];
            }
            this.push(Buffer.concat(out));
            done();
        }
        _flush(done) {
            this.push(Buffer.from(this.lastByte === 0x0a ? '.\r\n' : this.lastByte === 0x0d ? '\n.\r\n' : '\r\n.\r\n'));
            done();
        }
    };
}

// Hashes the wire form (all but the final ".\r\n") and its unstuffed form.
class WireHasher {
    constructor() {
        this.wire = crypto.createHash('sha256');
        this.data = crypto.createHash('sha256');
        this.pending = Buffer.alloc(0);
        this.lineStart = true;
        this.wireSize = 0;
        this.size = 0;
    }
    push(chunk) {
        const all = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
        if (all.length <= 3) {
            this.pending = Buffer.from(all);
            return;
        }
        this.pending = Buffer.from(all.subarray(all.length - 3));
        this.consume(all.subarray(0, all.length - 3));
    }
    consume(buf) {
        this.wire.update(buf);
        this.wireSize += buf.length;
        let lastPos = 0;
        for (let i = 0; i < buf.length; i++) {
            const byte = buf[i];
            if (this.lineStart && byte === 0x2e) {
                this.data.update(buf.subarray(lastPos, i));
                this.size += i - lastPos;
                lastPos = i + 1;
            }
            this.lineStart = byte === 0x0a;
        }
        this.data.update(buf.subarray(lastPos));
        this.size += buf.length - lastPos;
    }
    finish() {
        if (this.pending.toString('latin1') !== '.\r\n') {
            throw new Error('DATA encoder did not end with ".\\r\\n"');
        }
        return {
            sha256OfRaw: this.data.digest('hex'),
            sha256OfWire: this.wire.digest('hex'),
            size: this.size,
            wireSize: this.wireSize
        };
    }
}

// Passes the message through untouched; reports the hashes when it has all gone by.
class Tap extends Transform {
    constructor(onDone) {
        super();
        this.onDone = onDone;
        this.hasher = new WireHasher();
        this.encoder = new DataStream();
        this.encoder.on('data', chunk => this.hasher.push(chunk));
        this.messageHash = crypto.createHash('sha256');
    }
    _transform(chunk, enc, done) {
        if (typeof chunk === 'string') {
            chunk = Buffer.from(chunk, enc);
        }
        this.messageHash.update(chunk);
        this.encoder.write(chunk);
        this.push(chunk);
        done();
    }
    _flush(done) {
        this.encoder.once('end', () => {
            try {
                this.onDone({ ...this.hasher.finish(), sha256OfMessage: this.messageHash.digest('hex') });
                done();
            } catch (err) {
                done(err);
            }
        });
        this.encoder.end();
    }
}

const timeout = opts.timeoutMs || 15000;
const transportOptions = {
    host: opts.host || '127.0.0.1',
    port: opts.port,
    secure: !!opts.secure,
    pool: !!opts.pool,
    maxConnections: opts.maxConnections ?? 5,
    tls: { rejectUnauthorized: true },
    connectionTimeout: timeout,
    greetingTimeout: timeout,
    socketTimeout: timeout,
    dnsTimeout: timeout
};
if (opts.maxMessages !== undefined) {
    transportOptions.maxMessages = opts.maxMessages;
}
if (opts.caFile) {
    transportOptions.tls.ca = fs.readFileSync(opts.caFile);
}
if (opts.accessToken) {
    transportOptions.auth = { type: 'OAuth2', user: opts.user, accessToken: opts.accessToken };
} else if (opts.pass !== undefined) {
    transportOptions.auth = { user: opts.user, pass: opts.pass };
}
if (opts.debug) {
    const log = level => (...args) => console.error(`[nodemailer ${level}]`, ...args.filter(a => typeof a !== 'object'));
    transportOptions.logger = {
        trace: log('trace'),
        debug: log('debug'),
        info: log('info'),
        warn: log('warn'),
        error: log('error'),
        fatal: log('fatal')
    };
    transportOptions.debug = true;
}

const transporter = nodemailer.createTransport(transportOptions);

const hashes = new Map();
transporter.use('stream', (mail, done) => {
    const messageId = mail.message.messageId();
    mail.message.processFunc(input => {
        const tap = new Tap(result => hashes.set(messageId, result));
        return pipeline(input, tap, () => {});
    });
    done();
});

if (opts.verifyOnly) {
    try {
        await transporter.verify();
        transporter.close();
        emit({ ok: true, verified: true }, 0);
    } catch (err) {
        transporter.close();
        fail(err);
    }
} else {
    const count = opts.count ?? 1;
    const runId = crypto.randomBytes(6).toString('hex');
    const from = opts.from || opts.user;
    const to = opts.to || ['rcpt1@example.net', 'rcpt2@example.net'];
    const attachment = opts.attachmentSize ? crypto.randomBytes(opts.attachmentSize) : null;

    const mails = [];
    for (let i = 0; i < count; i++) {
        const mail = {
            from,
            to,
            messageId: `<msg-${i}-${runId}@xoauth2-proxy.test>`,
            subject: `msg ${i}`,
            // lines with leading dots exercise dot-stuffing (7bit text keeps them as they are)
            text: `Hello from nodemailer, message ${i}.\r\n.a line with a leading dot\r\n..\r\n.\r\nend\r\n`
        };
        if (i === 0) {
            mail.subject = `msg ${i} Grüße aus Köln ✓`;
            mail.headers = { 'X-Test-Unicode': 'Ünïcödé ✓' };
            mail.text = `Hello from nodemailer, message ${i}: Grüße, 日本語, emoji 📨.\r\n.leading dot\r\n`;
        }
        if (opts.cc) {
            mail.cc = opts.cc;
        }
        if (opts.bcc) {
            mail.bcc = opts.bcc;
        }
        if (attachment) {
            mail.attachments = [{ filename: 'random.bin', content: attachment, contentType: 'application/octet-stream' }];
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
            sent.push({
                index,
                messageId: info.messageId,
                response: info.response,
                accepted: info.accepted,
                rejected: info.rejected,
                ...(hashes.get(info.messageId) || {})
            });
        } else {
            errors.push({ index, ...errorReport(result.reason) });
        }
    });
    if (errors.length) {
        const first = results.find(r => r.status === 'rejected').reason;
        fail(first, { sent, errors });
    } else {
        emit({ ok: true, sent }, 0);
    }
}
