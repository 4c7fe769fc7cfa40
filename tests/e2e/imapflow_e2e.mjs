// End-to-end: imapflow through the proxy, configured as NocoBase's imap-smtp mail
// provider configures it (host, port, secure, auth: {user, pass}), against the real
// Dovecot behind it. Used by tests/e2e/run.py. The proxy's CA is trusted the way a
// NocoBase container trusts it: NODE_EXTRA_CA_CERTS in the environment, never a
// `tls` option here, and certificate verification stays on.
//
//   node tests/e2e/imapflow_e2e.mjs '<json>'
//
// Options: host, port, secure (false: plain, upgraded by STARTTLS when the server
// offers it, as imapflow does by itself; true: implicit TLS), user, pass, smtpPort
// and smtpSecure (the proxy's SMTP side, for the message that wakes the IDLE), runId,
// steps (default: all of connect, list, append, search, fetch, flags, idle; `source`
// is not in the default), messageIds (for `source`: each message is found by UID
// SEARCH HEADER Message-ID in INBOX and fetched whole, returned base64 in
// result.sources), idleWakeTimeoutMs (30000), timeoutMs (90000).
//
// result.secureConnection is imapflow's own view after connect(): true when the
// connection was TLS from the start or upgraded by STARTTLS.
//
// Prints one JSON line: {"ok":true, ...facts...} or {"ok":false, message,
// authenticationFailed, serverResponseCode, ...} (exit status 1). run.py asserts on
// the facts; this script throws only when imapflow itself fails.

import { createHash } from 'node:crypto';
import { createRequire } from 'node:module';

// The client libraries pinned by tests/node/package-lock.json.
const require = createRequire(new URL('../node/package.json', import.meta.url));
const { ImapFlow } = require('imapflow');
const nodemailer = require('nodemailer');

const args = JSON.parse(process.argv[2] || '{}');
const steps = args.steps || ['connect', 'list', 'append', 'search', 'fetch', 'flags', 'idle'];
const runId = args.runId || Math.random().toString(36).slice(2);
const result = { ok: true, stepsDone: [] };
let printed = false;

function print(obj, code) {
    if (printed) {
        return;
    }
    printed = true;
    process.stdout.write(JSON.stringify(obj) + '\n', () => process.exit(code));
}

function fail(err) {
    print(
        {
            ...result,
            ok: false,
            message: (err && err.message) || String(err),
            authenticationFailed: !!(err && err.authenticationFailed),
            serverResponseCode: (err && err.serverResponseCode) || null,
            responseText: (err && err.responseText) || null,
            response: err && typeof err.response === 'string' ? err.response : null,
            code: (err && err.code) || null
        },
        1
    );
}

process.on('uncaughtException', fail);
process.on('unhandledRejection', fail);

const deadline = setTimeout(() => {
    const err = new Error(`imapflow session timed out after ${args.timeoutMs || 90000} ms (steps done: ${result.stepsDone.join(', ')})`);
    err.code = 'DRIVER_TIMEOUT';
    fail(err);
}, args.timeoutMs || 90000);

const sha256 = buf => createHash('sha256').update(buf).digest('hex');
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// A multipart message with non-ASCII headers (RFC 2047) and an 8-bit-free body.
function buildMessage() {
    const boundary = `b-${runId}`;
    const text = Buffer.from('Grüße aus Köln — line one\r\n.a line with a leading dot\r\nend\r\n', 'utf8').toString('base64');
    const lines = [
        'From: =?UTF-8?Q?Zo=C3=AB_=C3=9Cnicode?= <driver@example.test>',
        `To: ${args.user}`,
        `Subject: =?UTF-8?B?${Buffer.from(`imapflow append ${runId} Grüße ✓`).toString('base64')}?=`,
        `Message-ID: <append-${runId}@e2e.example.test>`,
        `Date: ${new Date().toUTCString().replace('GMT', '+0000')}`,
        'MIME-Version: 1.0',
        `Content-Type: multipart/mixed; boundary="${boundary}"`,
        '',
        `--${boundary}`,
        'Content-Type: text/plain; charset=utf-8',
        'Content-Transfer-Encoding: base64',
        '',
        ...text.match(/.{1,76}/g),
        `--${boundary}`,
        'Content-Type: application/octet-stream; name="blob.bin"',
        'Content-Disposition: attachment; filename="blob.bin"',
        'Content-Transfer-Encoding: base64',
        '',
        ...Buffer.alloc(3000, 7).toString('base64').match(/.{1,76}/g),
        `--${boundary}--`,
        ''
    ];
    return Buffer.from(lines.join('\r\n'));
}

async function main() {
    // Exactly what NocoBase's imap-smtp provider hands imapflow (plus a quiet logger).
    const client = new ImapFlow({
        host: args.host,
        port: args.port,
        secure: !!args.secure,
        auth: { user: args.user, pass: args.pass },
        logger: false,
        connectionTimeout: 15000,
        greetingTimeout: 15000,
        socketTimeout: 60000
    });
    client.on('error', err => {
        result.errorEvents = (result.errorEvents || 0) + 1;
        result.lastErrorEvent = err && err.message;
    });
    const existsEvents = [];
    client.on('exists', data => existsEvents.push({ ...data, idling: client.idling, at: Date.now() }));

    await client.connect();
    result.secureConnection = !!client.secureConnection;
    result.capabilities = [...client.capabilities.keys()];
    result.enabled = [...(client.enabled || [])];
    result.compressed = !!client._deflate;
    result.stepsDone.push('connect');

    const message = buildMessage();
    result.messageSha256 = sha256(message);
    result.messageSize = message.length;
    let uid = null;

    for (const step of steps) {
        switch (step) {
            case 'connect':
                continue;
            case 'list': {
                const list = await client.list({ statusQuery: { messages: true, uidNext: true, unseen: true } });
                result.list = list.map(box => ({
                    path: box.path,
                    specialUse: box.specialUse || null,
                    status: box.status ? { messages: box.status.messages, uidNext: box.status.uidNext, unseen: box.status.unseen } : null
                }));
                break;
            }
            case 'append': {
                const res = await client.append('INBOX', message, ['\\Seen']);
                uid = res && res.uid;
                result.appended = { uid, uidValidity: res && res.uidValidity !== undefined ? Number(res.uidValidity) : null };
                break;
            }
            case 'search': {
                const lock = await client.getMailboxLock('INBOX');
                try {
                    result.selected = { exists: client.mailbox.exists, uidNext: client.mailbox.uidNext, uidValidity: Number(client.mailbox.uidValidity) };
                    result.searchByMessageId = await client.search({ header: { 'message-id': `<append-${runId}@e2e.example.test>` } }, { uid: true });
                    result.searchAll = (await client.search({ all: true }, { uid: true })).length;
                } finally {
                    lock.release();
                }
                break;
            }
            case 'fetch': {
                const lock = await client.getMailboxLock('INBOX');
                try {
                    const target = uid || (result.searchByMessageId || [])[0];
                    const partial = await client.fetchOne(
                        String(target),
                        { uid: true, flags: true, size: true, envelope: true, bodyStructure: true, source: { start: 0, maxLength: 100 }, bodyParts: ['1'] },
                        { uid: true }
                    );
                    const full = await client.fetchOne(String(target), { uid: true, source: true }, { uid: true });
                    result.fetched = {
                        uid: partial.uid,
                        rfc822Size: partial.size,
                        subject: partial.envelope && partial.envelope.subject,
                        messageId: partial.envelope && partial.envelope.messageId,
                        from: partial.envelope && partial.envelope.from && partial.envelope.from.map(a => ({ name: a.name, address: a.address })),
                        bodyType: partial.bodyStructure && partial.bodyStructure.type,
                        childTypes: partial.bodyStructure && (partial.bodyStructure.childNodes || []).map(n => n.type),
                        partialLength: partial.source ? partial.source.length : null,
                        partialMatches: partial.source ? partial.source.equals(message.subarray(0, 100)) : false,
                        part1: partial.bodyParts && partial.bodyParts.get('1') ? Buffer.from(partial.bodyParts.get('1').toString(), 'base64').toString('utf8') : null,
                        flags: partial.flags ? [...partial.flags] : [],
                        fullSha256: sha256(full.source),
                        fullSize: full.source.length
                    };
                } finally {
                    lock.release();
                }
                break;
            }
            case 'flags': {
                const lock = await client.getMailboxLock('INBOX');
                try {
                    const target = String(uid || (result.searchByMessageId || [])[0]);
                    const added = await client.messageFlagsAdd(target, ['\\Flagged', '$NocoBase'], { uid: true });
                    const removed = await client.messageFlagsRemove(target, ['\\Seen'], { uid: true });
                    const after = await client.fetchOne(target, { uid: true, flags: true }, { uid: true });
                    result.flags = { added, removed, after: [...after.flags] };
                } finally {
                    lock.release();
                }
                break;
            }
            case 'idle': {
                // Select INBOX and leave the connection alone: imapflow starts IDLE by
                // itself on an idle selected mailbox (auto-IDLE, as NocoBase relies on).
                // Then send a message to the same mailbox through the proxy's SMTP side
                // and wait for the EXISTS that ends the wait.
                await client.mailboxOpen('INBOX');
                const before = client.mailbox.exists;
                const idleStarted = Date.now();
                // (imapflow's auto-IDLE starts 15 s after the last command.)
                while (!client.idling) {
                    if (Date.now() - idleStarted > 30000) {
                        throw new Error('imapflow did not start IDLE within 30 s');
                    }
                    await sleep(50);
                }
                await sleep(300);
                const transporter = nodemailer.createTransport({
                    host: args.host,
                    port: args.smtpPort,
                    secure: !!args.smtpSecure,
                    auth: { user: args.user, pass: args.pass }
                });
                const subject = `idle wake-up ${runId}`;
                const info = await transporter.sendMail({ from: args.user, to: args.user, subject, text: 'Wake up.\r\n' });
                transporter.close();
                const sentAt = Date.now();
                const wakeTimeout = args.idleWakeTimeoutMs || 30000;
                let woke = null;
                while (!woke) {
                    woke = existsEvents.find(e => e.count > before);
                    if (woke) {
                        break;
                    }
                    if (Date.now() - sentAt > wakeTimeout) {
                        throw new Error(`no EXISTS within ${wakeTimeout} ms of sending through the proxy's SMTP side (idling: ${client.idling})`);
                    }
                    await sleep(50);
                }
                result.idle = {
                    before,
                    after: woke.count,
                    wokeWhileIdling: woke.idling,
                    latencyMs: woke.at - sentAt,
                    smtpResponse: info.response
                };
                const lock = await client.getMailboxLock('INBOX');
                try {
                    const found = await client.search({ header: { 'message-id': info.messageId } }, { uid: true });
                    if (found.length) {
                        const msg = await client.fetchOne(String(found[0]), { uid: true, envelope: true }, { uid: true });
                        result.idle.subject = msg.envelope.subject;
                    }
                    result.idle.expectedSubject = subject;
                } finally {
                    lock.release();
                }
                break;
            }
            case 'source': {
                const lock = await client.getMailboxLock('INBOX');
                try {
                    result.sources = {};
                    for (const messageId of args.messageIds || []) {
                        const found = await client.search({ header: { 'message-id': messageId } }, { uid: true });
                        if (found.length !== 1) {
                            throw new Error(`UID SEARCH HEADER Message-ID ${messageId} found ${found.length} messages`);
                        }
                        const msg = await client.fetchOne(String(found[0]), { uid: true, source: true }, { uid: true });
                        result.sources[messageId] = msg.source.toString('base64');
                    }
                } finally {
                    lock.release();
                }
                break;
            }
            default:
                throw new Error(`unknown step ${step}`);
        }
        result.stepsDone.push(step);
    }
    await client.logout();
    clearTimeout(deadline);
    print(result, 0);
}

main().catch(fail);
