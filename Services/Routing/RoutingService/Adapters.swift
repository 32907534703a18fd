import AsyncHTTPClient
import Contracts
import Crypto
import Foundation
import RPC
import NIOCore
import NIOExtras
import NIOPosix
import Rules

/// Sends one delivery on its current channel to its address.
protocol ChannelAdapter: Sendable {
    /// The endpoint's name, for its circuit (`CircuitBreakers`) and the log.
    var name: String { get }
    func send(_ delivery: RoutingV1.Delivery) async -> RoutingStore.SendResult
}

/// The adapters configured, by channel: email to SMTP when configured, every other channel
/// (and email without SMTP) to the webhook.
struct Adapters: Sendable {
    let webhook: WebhookAdapter?
    let smtp: SMTPAdapter?
    /// A circuit per adapter, shared by every dispatcher of this service.
    let breakers: CircuitBreakers

    init(configuration: RoutingConfiguration, group: any EventLoopGroup) throws {
        webhook = try configuration.webhook.map { try WebhookAdapter($0, group: group) }
        smtp = configuration.smtp.map { SMTPAdapter($0, group: group) }
        breakers = CircuitBreakers(threshold: configuration.breakerFailures, initialCooldownMs: Int64(configuration.breakerCooldownMs),
                                   maxCooldownMs: Int64(configuration.breakerMaxCooldownMs))
    }

    /// The channels whose adapter's circuit holds its deliveries now.
    func heldChannels(nowMs: Int64) -> Set<CommonV1.Channel> {
        let held = breakers.held(nowMs: nowMs)
        guard !held.isEmpty else { return [] }
        return Set(Planner.allChannels.filter { adapter(for: $0).map { held.contains($0.name) } ?? false })
    }

    func adapter(for channel: CommonV1.Channel) -> (any ChannelAdapter)? {
        guard Planner.allChannels.contains(channel) else { return nil }
        if channel == .email, let smtp { return smtp }
        return webhook
    }

    var channels: Set<CommonV1.Channel> { Set(Planner.allChannels.filter { adapter(for: $0) != nil }) }

    func shutdown() async {
        try? await webhook?.client.shutdown()
    }
}

/// Posts a JSON body to the configured endpoint. Headers: `Idempotency-Key` (the
/// delivery's key: the receiver discards duplicates after a crash), `X-Arbiter-Delivery`,
/// and, with a secret, `X-Arbiter-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">`. 2xx is sent; 408, 429, 5xx, a timeout or a refused connection are
/// retried; any other status is a permanent failure on this channel.
struct WebhookAdapter: ChannelAdapter {
    var name: String { "webhook" }

    struct Endpoint {
        var url: String
        init?(_ url: String) {
            guard let parsed = URL(string: url), let scheme = parsed.scheme, ["http", "https"].contains(scheme.lowercased()),
                  let host = parsed.host, !host.isEmpty else { return nil }
            self.url = url
        }
    }

    let endpoint: Endpoint
    /// The signing secret (a `SymmetricKey` is not Sendable; one is made per request).
    let secret: [UInt8]?
    let timeout: TimeAmount
    let client: HTTPClient

    init(_ configuration: RoutingConfiguration.Webhook, group: any EventLoopGroup) throws {
        guard let endpoint = Endpoint(configuration.url) else { throw ConfigurationError("webhook.url: \(configuration.url)") }
        self.endpoint = endpoint
        if let file = configuration.secretFile {
            guard let data = FileManager.default.contents(atPath: file) else { throw ConfigurationError("webhook.secretFile: cannot read \(file)") }
            let secret = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            guard !secret.isEmpty else { throw ConfigurationError("webhook.secretFile: \(file) is empty") }
            self.secret = Array(secret.utf8)
        } else {
            secret = nil
        }
        timeout = .milliseconds(Int64(configuration.timeoutMs))
        var http = HTTPClient.Configuration()
        http.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 64)
        // A redirect is not followed: on 301, 302 and 303 the client would repeat the POST as a
        // GET without its body, and a 2xx to that would read as delivered. It is a permanent
        // failure naming the new location (the endpoint is configured wrong).
        http.redirectConfiguration = .disallow
        http.timeout = .init(connect: .milliseconds(Int64(min(configuration.timeoutMs, 5000))), read: timeout)
        client = HTTPClient(eventLoopGroup: group, configuration: http)
    }

    /// The JSON the endpoint receives (keys sorted).
    struct Body: Encodable {
        var delivery_id, idempotency_key, person_id, channel, address, purpose, urgency, template_id: String
        var variables: [String: String]
        var attempt: Int
    }

    static let encoder = {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }()

    static func body(_ d: RoutingV1.Delivery) -> Data {
        let body = Body(delivery_id: d.deliveryId, idempotency_key: d.idempotencyKey, person_id: d.personId, channel: d.channel.ruleName,
                        address: d.address, purpose: d.purpose, urgency: d.urgency == .critical ? "critical" : "normal",
                        template_id: d.message?.templateId ?? "", variables: d.message?.variables ?? [:], attempt: Int(d.attempts) + 1)
        return (try? encoder.encode(body)) ?? Data("{}".utf8)
    }

    /// `t=<seconds>,v1=<hex>` for `body` at `seconds`.
    static func signature(_ body: Data, key: SymmetricKey, seconds: Int64) -> String {
        let mac = HMAC<SHA256>.authenticationCode(for: Data("\(seconds).".utf8) + body, using: key)
        return "t=\(seconds),v1=" + mac.map { String(format: "%02x", $0) }.joined()
    }

    /// `Retry-After` in milliseconds from `now`: delay seconds, or an HTTP date; nil when
    /// absent or unreadable, 0 for a date already past.
    static func retryAfterMs(_ value: String?, now: Date) -> Int64? {
        guard let value = value?.trimmingCharacters(in: .whitespaces), !value.isEmpty else { return nil }
        if value.allSatisfy(\.isASCII) && value.allSatisfy(\.isNumber) {
            return Int64(value).map { $0.multipliedReportingOverflow(by: 1000).overflow ? Int64.max : $0 * 1000 }
        }
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "GMT")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss zzz"
        guard let date = formatter.date(from: value) else { return nil }
        return max(0, Int64(date.timeIntervalSince(now) * 1000))
    }

    func send(_ d: RoutingV1.Delivery) async -> RoutingStore.SendResult {
        let body = Self.body(d)
        var request = HTTPClientRequest(url: endpoint.url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "Idempotency-Key", value: RoutingStore.sendKey(d))
        request.headers.add(name: "X-Arbiter-Delivery", value: d.deliveryId)
        if let secret {
            request.headers.add(name: "X-Arbiter-Signature", value: Self.signature(body, key: SymmetricKey(data: secret), seconds: Int64(Date().timeIntervalSince1970)))
        }
        request.body = .bytes(ByteBuffer(bytes: body))
        do {
            let deadline = ContinuousClock.now + .nanoseconds(timeout.nanoseconds)
            let response = try await client.execute(request, timeout: timeout)
            // The status decides; the body is read only so the connection can be reused, and
            // within what is left of the timeout, which ends with the headers in the client (a
            // receiver sending its body a byte every few seconds held a sending slot for hours).
            await withTaskGroup(of: Void.self) { group in
                group.addTask { _ = try? await response.body.collect(upTo: 64 << 10) }
                group.addTask { try? await Task.sleep(until: deadline, clock: .continuous) }
                await group.next()
                group.cancelAll()
            }
            let code = Int(response.status.code)
            switch code {
            case 200..<300: return .sent
            case 408, 429, 500...:
                return .transient("webhook: HTTP \(code)", retryAfterMs: Self.retryAfterMs(response.headers.first(name: "Retry-After"), now: Date()))
            case 300..<400:
                return .permanent("webhook: HTTP \(code), redirected to \(response.headers.first(name: "Location") ?? "nowhere"): not followed (configure that URL)")
            default: return .permanent("webhook: HTTP \(code)")
            }
        } catch {
            return .transient("webhook: \(error)")
        }
    }
}

/// Sends email through an SMTP relay: EHLO, MAIL FROM, RCPT TO, DATA, QUIT, one connection
/// per message. The variables "subject" and "body" give the subject and the text (else the
/// template id and the variables as lines); the idempotency key travels in
/// `X-Arbiter-Idempotency-Key`. A 4xx reply or a network error is retried; 5xx is permanent.
struct SMTPAdapter: ChannelAdapter {
    var name: String { "smtp" }
    let configuration: RoutingConfiguration.SMTP
    let group: any EventLoopGroup

    init(_ configuration: RoutingConfiguration.SMTP, group: any EventLoopGroup) {
        self.configuration = configuration
        self.group = group
    }

    struct Reply: Error, CustomStringConvertible {
        var code: Int
        var text: String
        var description: String { "SMTP \(code) \(text)" }
    }

    /// Header-safe text: no CR or LF.
    static func headerSafe(_ text: String) -> String {
        String(text.unicodeScalars.map { $0 == "\r" || $0 == "\n" ? " " : Character($0) })
    }

    /// The message, CRLF line endings, dot-stuffed, ending with the lone ".".
    static func message(_ d: RoutingV1.Delivery, from: String, date: Date) -> String {
        let variables = d.message?.variables ?? [:]
        let subject = headerSafe(variables["subject"] ?? d.message?.templateId ?? "")
        let text = variables["body"] ?? (["template: \(d.message?.templateId ?? "")"]
            + variables.keys.sorted().map { "\($0): \(variables[$0]!)" }).joined(separator: "\n")
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "EEE, dd MMM yyyy HH:mm:ss Z"
        let headers = [
            "From: <\(from)>", "To: <\(headerSafe(d.address))>", "Subject: \(subject)", "Date: \(formatter.string(from: date))",
            "Message-ID: <\(d.deliveryId)@arbiter>", "X-Arbiter-Idempotency-Key: \(headerSafe(RoutingStore.sendKey(d)))",
            "X-Arbiter-Delivery: \(d.deliveryId)", "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
        let lines = bodyLines(text).map { $0.hasPrefix(".") ? "." + $0 : $0 }
        return (headers + [""] + lines).joined(separator: "\r\n") + "\r\n.\r\n"
    }

    /// The body's lines, split at every CR, LF or CRLF, read as Unicode scalars: as
    /// characters, "\r\r\n" holds no "\n" (its "\r\n" is one character), and a client's
    /// variable could end the DATA early and write SMTP commands of its own.
    static func bodyLines(_ text: String) -> [String] {
        var lines: [String] = []
        var line = String.UnicodeScalarView()
        var afterCR = false
        for scalar in text.unicodeScalars {
            if scalar == "\n" && afterCR {
                afterCR = false
                continue
            }
            afterCR = scalar == "\r"
            if scalar == "\r" || scalar == "\n" {
                lines.append(String(line))
                line = String.UnicodeScalarView()
            } else {
                line.append(scalar)
            }
        }
        lines.append(String(line))
        return lines
    }

    func send(_ d: RoutingV1.Delivery) async -> RoutingStore.SendResult {
        guard d.address.contains("@"), !d.address.contains(where: { $0.isNewline || $0 == "<" || $0 == ">" || $0 == " " }) else {
            return .permanent("smtp: not an email address: \(d.address)")
        }
        let timeout = Duration.milliseconds(configuration.timeoutMs)
        do {
            let channel = try await ClientBootstrap(group: group)
                .connectTimeout(.milliseconds(Int64(configuration.timeoutMs)))
                .connect(host: configuration.host, port: configuration.port) { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(LineBasedFrameDecoder()))
                        return try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
                    }
                }
            let raw = channel.channel
            return try await withThrowingTaskGroup(of: RoutingStore.SendResult?.self) { group in
                group.addTask {
                    try await channel.executeThenClose { inbound, outbound in
                        var lines = inbound.makeAsyncIterator()
                        func reply() async throws -> Reply {
                            var text: [String] = []
                            while let line = try await lines.next() {
                                let s = String(buffer: line)
                                guard s.count >= 3, let code = Int(s.prefix(3)) else { throw Reply(code: 0, text: "malformed reply \(s)") }
                                text.append(String(s.dropFirst(4)))
                                if s.count == 3 || s[s.index(s.startIndex, offsetBy: 3)] != "-" { return Reply(code: code, text: text.joined(separator: " ")) }
                            }
                            throw Reply(code: 0, text: "connection closed")
                        }
                        func command(_ line: String, expect: ClosedRange<Int>) async throws {
                            if !line.isEmpty { try await outbound.write(ByteBuffer(string: line + "\r\n")) }
                            let r = try await reply()
                            guard expect.contains(r.code) else { throw r }
                        }
                        try await command("", expect: 220...220)
                        try await command("EHLO \(configuration.heloName)", expect: 250...250)
                        try await command("MAIL FROM:<\(configuration.from)>", expect: 250...250)
                        try await command("RCPT TO:<\(d.address)>", expect: 250...251)
                        try await command("DATA", expect: 354...354)
                        try await outbound.write(ByteBuffer(string: Self.message(d, from: configuration.from, date: Date())))
                        try await command("", expect: 250...250)
                        try? await outbound.write(ByteBuffer(string: "QUIT\r\n"))
                        return .sent
                    }
                }
                group.addTask {
                    try await Task.sleep(for: timeout)
                    raw.close(promise: nil)
                    return .transient("smtp: no answer within \(configuration.timeoutMs) ms")
                }
                let first = try await group.next()!
                group.cancelAll()
                return first!
            }
        } catch let reply as Reply {
            return (400..<500).contains(reply.code) || reply.code == 0 ? .transient("smtp: \(reply)") : .permanent("smtp: \(reply)")
        } catch {
            return .transient("smtp: \(error)")
        }
    }
}
