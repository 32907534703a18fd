import CContracts
@testable import Contracts
import Foundation
import GRDB
import RPC
import Rules
import Testing
import TestSupport

/// Requests no honest client would send, to every method of the four services as processes:
/// each answers with a status a client can act on, none crashes, and every store is sound.
@Suite("hostile input: every method of the four services")
struct HostileInputTests {
    /// Codes that say the service failed, not the request.
    static let failures: Set<RPCError.Code> = [.internal, .unknown, .unimplemented, .dataLoss]

    @Test("random well-formed requests to every method, one at a time and then from 8 clients at once, get an answer or a client's error; no service crashes; every store passes integrity_check")
    func randomRequests() async throws {
        let dataDir = temporaryDirectory("hostile")
        let suite = try await WiredSuite.start(dataDir: dataDir, arguments: ["--log-level", "critical"])
        defer { suite.kill() }
        let (processes, clients) = (suite.processes, suite.clients)
        let services: [(name: String, methods: [any AnyMethodDescriptor])] = [
            ("identity", IdentityV1.Identity.methods), ("profile", ProfileV1.Profile.methods),
            ("routing", RoutingV1.Routing.methods), ("decision", DecisionV1.Decision.methods),
        ]
        // A failure names its seed: HOSTILE_SEED=<seed> draws the same sequence again, though
        // not the same bytes where a request carries ids the services made (they are random),
        // nor the same interleaving from 8 clients. HOSTILE_ROUNDS=<n> draws more.
        let environment = ProcessInfo.processInfo.environment
        let seed = environment["HOSTILE_SEED"].flatMap { UInt64($0) } ?? .random(in: 0 ... .max)
        let rounds = environment["HOSTILE_ROUNDS"].flatMap { Int($0) } ?? 60
        var messages = HostileMessages(seed: seed)
        var answers: [String: [String: Int]] = [:]  // method → status → count
        // Rounds over every method, so that one method's writes meet the others' reads.
        for round in 0..<rounds {
            for (name, methods) in services {
                for method in methods {
                    let payload = messages.bytes(for: method.inputType.protoDescriptor.pointer)
                    do {
                        let answer = try await clients[name]!.call(method, payload: payload, timeout: .seconds(20))
                        messages.learn(answer, method.outputType.protoDescriptor.pointer)
                        answers[method.method, default: [:]]["OK", default: 0] += 1
                    } catch {
                        answers[method.method, default: [:]]["\(error.code)", default: 0] += 1
                        let running = processes[name]!.process.isRunning
                        #expect(running && !Self.failures.contains(error.code),
                                "\(name) \(method.fullName) (seed \(seed), round \(round)) answered \(error.code): \(error.message)\(running ? "" : " and exited"); request \(payload.hexString)")
                        if !running {
                            Issue.record("\(name) stderr: \(await processes[name]!.crashReport)")
                            return
                        }
                    }
                }
            }
        }
        print("hostile input, seed \(seed):", answers.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value.sorted { $0.key < $1.key })" }.joined(separator: "\n"))

        // Then the same at once from 8 clients, so that writes race each other and the
        // identity feed's merges and erasures race the calls they touch.
        let targets = services.flatMap { service in service.methods.map { (service.name, $0) } }
        let clientsByName = clients
        let failures = await withTaskGroup(of: [String].self) { group in
            for worker in 0..<8 {
                var generator = messages
                generator.random = SplitMix64(seed: seed &+ UInt64(worker) &+ 1)
                group.addTask {
                    var failures: [String] = []
                    for call in 0..<rounds * 4 {
                        let (name, method) = targets[generator.random.int(targets.count)]
                        let payload = generator.bytes(for: method.inputType.protoDescriptor.pointer)
                        do {
                            let answer = try await clientsByName[name]!.call(method, payload: payload, timeout: .seconds(20))
                            generator.learn(answer, method.outputType.protoDescriptor.pointer)
                        } catch let error as RPCError {
                            guard Self.failures.contains(error.code) || error.code == .unavailable else { continue }
                            failures.append("\(name) \(method.fullName) (seed \(seed), worker \(worker), call \(call)) answered \(error.code): \(error.message); request \(payload.hexString)")
                        } catch {
                            failures.append("\(name) \(method.fullName): \(error)")
                        }
                    }
                    return failures
                }
            }
            return await group.reduce(into: []) { $0 += $1 }
        }
        #expect(failures.isEmpty, "\(failures.prefix(5).joined(separator: "\n"))")
        for (name, process) in processes where !process.process.isRunning {
            Issue.record("\(name) exited; stderr: \(await process.crashReport)")
            return
        }
        for (name, _) in services {
            let health = try await clients[name]!.call(HealthV1.Health.check, HealthV1.HealthCheckRequest())
            #expect(health.status == .serving, "\(name)")
        }
        for (name, status) in await suite.stop() { #expect(status == 0, "\(name) stopped") }
        for name in WiredSuite.names {
            let directory = dataDir + "/" + name
            for file in try FileManager.default.contentsOfDirectory(atPath: directory) where file.hasSuffix(".sqlite") {
                let queue = try DatabaseQueue(path: directory + "/" + file)
                #expect(try await queue.read(Self.integrityProblems) == [], "\(name)/\(file)")
            }
        }
    }
}

extension HostileInputTests {
    /// `PRAGMA integrity_check`'s findings. SQLite 3.40 (Debian 12) reports "NULL value in
    /// t.c" for every row of a WITHOUT ROWID table whose NOT NULL column is stored elsewhere
    /// than declared (the decision store's `offer`); such a finding counts only when a query
    /// finds the NULL.
    static func integrityProblems(_ db: Database) throws -> [String] {
        try String.fetchAll(db, sql: "PRAGMA integrity_check").filter { problem in
            guard problem != "ok" else { return false }
            let parts = problem.split(separator: " ")
            guard parts.count == 4, problem.hasPrefix("NULL value in "), case let names = parts[3].split(separator: "."),
                  names.count == 2 else { return true }
            return try Int.fetchOne(db, sql: "SELECT count(*) FROM \"\(names[0])\" WHERE \"\(names[1])\" IS NULL")! > 0
        }
    }
}

extension [UInt8] {
    var hexString: String { map { String(format: "%02x", $0) }.joined() }
}

/// Well-formed protobuf wire bytes for requests, drawn field by field from the message's
/// protobuf-c descriptor. Each field takes a plausible value for its name (identifier types,
/// placements, rules, small counts, recent times; identifiers from a small set and from
/// earlier answers, so that calls meet each other's persons, actions, decisions and
/// deliveries) or, with the message's hostility, one at the edges: empty and very long
/// strings, rules that do not parse, 0, -1, the extremes of each integer, NaN and
/// infinities, enum numbers no build knows, large repeated fields.
struct HostileMessages {
    static let plausibleByName: [String: [String]] = [
        "type": ["email", "phone", "customer_id", "device_id", "cookie_id", "view", "purchase"],
        "identifier_type": ["email", "phone", "customer_id", "device_id", "cookie_id"],
        "value": ["ada@example.com", "Bo@Example.org", "+14155550123", "dev-1", "ck-1", "c-1"],
        "placement": ["home", "cart"], "placements": ["home", "cart"],
        "eligibility": ["", "trait.tier == \"gold\"", "feature.views_7d >= 2 or segment.vip", "context.device == \"ios\""],
        "rule": ["trait.tier == \"gold\"", "feature.views_7d >= 2 and segment.vip", "consent.email"],
        "filter": ["", "property.sku == \"x\""],
        "id": ["a", "b"], "action_id": ["a", "b"], "held_out_actions": ["a"],
        "policy": ["no_exploration", "rules_only", "highest_value", "always:a", "logging"],
        "author": ["ops"], "source": ["crm", "web"], "reason": ["test"], "ended_by": ["ops"],
        "name": ["views_7d", "vip", "tier", "a", "email", "email_verified", "phone", "phone_verified", "push_token"], "event_type": ["view", "purchase"], "property": ["sku", "price"],
        "purpose": ["marketing"], "consent_purpose": ["marketing"],
        "segment": ["vip", "gold"], "segments": ["vip", "gold"],
        "time_zone": ["Europe/Paris", "UTC", "America/New_York"],
        "fields": ["traits", "features", "segments", "consent"],
        "key": ["device", "tier", "sku"], "string_value": ["gold", "ios", "x", "ada@example.com", "+14155550123"],
        "kind": ["force", "ban"],
    ]
    static let plausibleStrings = ["a", "b", "p1", "p2", "home", "gold", "vip", "x"]
    static let hostileStrings = [
        "", "a b", "Ümlaut", "😀", "not an email", "trait.tier in [\"gold\"", "(((((", "context.device == ", "00:00", "25:99",
        "Europe/Paris", "Not/AZone", "http://127.0.0.1:1/x", "-1", "1e309", "NaN", "segment.", "feature.x >= 1e400",
        String(repeating: "x", count: 300), String(repeating: "é", count: 5_000), String(repeating: "(", count: 2_000),
        String(repeating: "not ", count: 3_000) + "trait.a",
    ]
    static let hostileIntegers: [Int64] = [-1, 604_800_000, -1_700_000_000_000, Int64(Int32.max), Int64(Int32.min),
                                           Int64(UInt32.max), .max, .min]
    static let plausibleDoubles: [Double] = [0.5, 1, 2, 10, 99.5]
    static let hostileDoubles: [Double] = [-0.0, -1, 1e-300, 1e300, -1e300, .nan, .infinity, -.infinity,
                                           .greatestFiniteMagnitude, .leastNonzeroMagnitude]

    var random: SplitMix64
    /// Strings found in earlier answers (person, decision and delivery ids).
    var seen: [String] = []
    let nowMs = Int64(Date().timeIntervalSince1970 * 1000)

    init(seed: UInt64) { random = SplitMix64(seed: seed) }

    mutating func bytes(for descriptor: UnsafePointer<ProtobufCMessageDescriptor>) -> [UInt8] {
        var out: [UInt8] = []
        let hostility = [0.0, 0.02, 0.1, 0.3][random.int(4)]
        write(descriptor, hostility: hostility, depth: 0, into: &out)
        return out
    }

    /// Keeps the identifiers in an answer (its short strings) for later requests.
    mutating func learn(_ bytes: [UInt8], _ descriptor: UnsafePointer<ProtobufCMessageDescriptor>) {
        guard let message = bytes.withUnsafeBufferPointer({ protobuf_c_message_unpack(descriptor, nil, $0.count, $0.baseAddress) }) else { return }
        defer { protobuf_c_message_free_unpacked(message, nil) }
        collect(UnsafeRawPointer(message), descriptor, depth: 0)
        if seen.count > 400 { seen.removeFirst(seen.count - 400) }
    }

    private mutating func collect(_ message: UnsafeRawPointer, _ descriptor: UnsafePointer<ProtobufCMessageDescriptor>, depth: Int) {
        guard depth < 4 else { return }
        for i in 0..<Int(descriptor.pointee.n_fields) {
            let field = descriptor.pointee.fields + i
            // A oneof's members share their memory: only the one selected holds its type.
            if field.pointee.flags & UInt32(PROTOBUF_C_FIELD_FLAG_ONEOF.rawValue) != 0,
               message.load(fromByteOffset: Int(field.pointee.quantifier_offset), as: UInt32.self) != field.pointee.id {
                continue
            }
            let at = message + Int(field.pointee.offset)
            let repeated = field.pointee.label == PROTOBUF_C_LABEL_REPEATED
            let count = repeated ? min(message.load(fromByteOffset: Int(field.pointee.quantifier_offset), as: Int.self), 20) : 1
            func element(_ k: Int) -> UnsafeRawPointer? {
                repeated ? at.load(as: UnsafeRawPointer?.self).map { $0 + k * MemoryLayout<UnsafeRawPointer>.stride } : at
            }
            switch field.pointee.type {
            case PROTOBUF_C_TYPE_STRING:
                for k in 0..<count {
                    guard let p = element(k)?.load(as: UnsafePointer<CChar>?.self) else { continue }
                    let string = String(cString: p)
                    if (4...64).contains(string.utf8.count), !string.contains(" ") { seen.append(string) }
                }
            case PROTOBUF_C_TYPE_MESSAGE:
                let inner = field.pointee.descriptor.assumingMemoryBound(to: ProtobufCMessageDescriptor.self)
                for k in 0..<count {
                    guard let p = element(k)?.load(as: UnsafeRawPointer?.self) else { continue }
                    collect(p, inner, depth: depth + 1)
                }
            default:
                break
            }
        }
    }

    private mutating func write(_ descriptor: UnsafePointer<ProtobufCMessageDescriptor>, hostility: Double, depth: Int,
                                into out: inout [UInt8]) {
        for i in 0..<Int(descriptor.pointee.n_fields) {
            let field = descriptor.pointee.fields + i
            // A plausible message has every field; a hostile one misses some.
            guard random.unit() >= hostility else { continue }
            var count = 1
            if field.pointee.label == PROTOBUF_C_LABEL_REPEATED, hostility > 0 {
                count = random.unit() < hostility / 5 ? 150 : 1 + random.int(3)
            }
            for _ in 0..<count { writeField(field, hostility: hostility, depth: depth, into: &out) }
        }
    }

    private mutating func plausibleString(_ name: String) -> String {
        // Idempotency keys: mostly new ones, sometimes one used before (a replay).
        if ["idempotency_key", "event_id", "outcome_id"].contains(name), random.unit() < 0.7 { return "k\(random.next() % 1_000_000)" }
        if let pool = Self.plausibleByName[name], random.unit() < 0.9 { return pool[random.int(pool.count)] }
        if !seen.isEmpty, random.unit() < 0.5 { return seen[random.int(seen.count)] }
        return Self.plausibleStrings[random.int(Self.plausibleStrings.count)]
    }

    private mutating func plausibleInteger(_ name: String) -> Int64 {
        let hour: Int64 = 3_600_000
        if ["starts_at_ms", "not_before_ms", "from_ms"].contains(name) { return nowMs - Int64(random.int(Int(hour))) }
        if ["ends_at_ms", "not_after_ms", "to_ms", "expires_at_ms"].contains(name) {
            return random.int(3) == 0 ? 0 : nowMs + hour + Int64(random.int(Int(24 * hour)))
        }
        if name == "half_life_seconds" { return random.int(3) == 0 ? 86_400 : 0 }
        if name.hasSuffix("_ms") { return nowMs + Int64(random.int(7_200_000)) - 3_600_000 }
        if name.hasSuffix("_seconds") { return [60, 3_600, 86_400, 604_800][random.int(4)] }
        if name.hasSuffix("_seq") { return Int64(random.int(50)) }
        return Int64(1 + random.int(5))
    }

    private mutating func writeField(_ field: UnsafePointer<ProtobufCFieldDescriptor>, hostility: Double, depth: Int,
                                     into out: inout [UInt8]) {
        let number = UInt64(field.pointee.id)
        let name = String(cString: field.pointee.name)
        let hostile = random.unit() < hostility
        func key(_ wireType: UInt64, _ out: inout [UInt8]) { Self.varint(number << 3 | wireType, &out) }
        func integer(_ this: inout HostileMessages) -> Int64 {
            guard hostile else { return this.plausibleInteger(name) }
            return this.random.unit() < 0.3 ? Int64(bitPattern: this.random.next()) : Self.hostileIntegers[this.random.int(Self.hostileIntegers.count)]
        }
        func double(_ this: inout HostileMessages) -> Double {
            if hostile { return Self.hostileDoubles[this.random.int(Self.hostileDoubles.count)] }
            if ["rate", "share", "probability", "propensity"].contains(where: name.contains) { return [0.05, 0.1, 0.5][this.random.int(3)] }
            return Self.plausibleDoubles[this.random.int(Self.plausibleDoubles.count)]
        }
        switch field.pointee.type {
        case PROTOBUF_C_TYPE_INT32, PROTOBUF_C_TYPE_INT64, PROTOBUF_C_TYPE_UINT32, PROTOBUF_C_TYPE_UINT64:
            key(0, &out)
            Self.varint(UInt64(bitPattern: integer(&self)), &out)
        case PROTOBUF_C_TYPE_SINT32, PROTOBUF_C_TYPE_SINT64:
            key(0, &out)
            let n = integer(&self)
            Self.varint(UInt64(bitPattern: (n << 1) ^ (n >> 63)), &out)
        case PROTOBUF_C_TYPE_BOOL:
            key(0, &out)
            Self.varint(UInt64(random.int(2)), &out)
        case PROTOBUF_C_TYPE_ENUM:
            key(0, &out)
            let enumeration = field.pointee.descriptor.assumingMemoryBound(to: ProtobufCEnumDescriptor.self)
            let n = Int(enumeration.pointee.n_values)
            // Plausible: a declared value other than the first (each enum's UNSPECIFIED).
            let value = !hostile && n > 1 ? Int64(enumeration.pointee.values[1 + random.int(n - 1)].value) : integer(&self)
            Self.varint(UInt64(bitPattern: value), &out)
        case PROTOBUF_C_TYPE_FIXED32, PROTOBUF_C_TYPE_SFIXED32:
            key(5, &out)
            Self.little(UInt64(UInt32(truncatingIfNeeded: integer(&self))), 4, &out)
        case PROTOBUF_C_TYPE_FIXED64, PROTOBUF_C_TYPE_SFIXED64:
            key(1, &out)
            Self.little(UInt64(bitPattern: integer(&self)), 8, &out)
        case PROTOBUF_C_TYPE_FLOAT:
            key(5, &out)
            Self.little(UInt64(Float(double(&self)).bitPattern), 4, &out)
        case PROTOBUF_C_TYPE_DOUBLE:
            key(1, &out)
            Self.little(double(&self).bitPattern, 8, &out)
        case PROTOBUF_C_TYPE_STRING:
            key(2, &out)
            let string = hostile ? Self.hostileStrings[random.int(Self.hostileStrings.count)] : plausibleString(name)
            Self.lengthDelimited(Array(string.utf8), &out)
        case PROTOBUF_C_TYPE_BYTES:
            key(2, &out)
            Self.lengthDelimited((0..<random.int(40)).map { _ in UInt8(truncatingIfNeeded: random.next()) }, &out)
        case PROTOBUF_C_TYPE_MESSAGE:
            guard depth < 4 else { return }
            key(2, &out)
            var inner: [UInt8] = []
            write(field.pointee.descriptor.assumingMemoryBound(to: ProtobufCMessageDescriptor.self), hostility: hostility,
                  depth: depth + 1, into: &inner)
            Self.lengthDelimited(inner, &out)
        default:
            preconditionFailure("protobuf-c type \(field.pointee.type) not drawn")
        }
    }

    private static func varint(_ value: UInt64, _ out: inout [UInt8]) {
        var value = value
        while value >= 0x80 {
            out.append(UInt8(truncatingIfNeeded: value) | 0x80)
            value >>= 7
        }
        out.append(UInt8(value))
    }

    private static func little(_ value: UInt64, _ bytes: Int, _ out: inout [UInt8]) {
        for i in 0..<bytes { out.append(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) }
    }

    private static func lengthDelimited(_ bytes: [UInt8], _ out: inout [UInt8]) {
        varint(UInt64(bytes.count), &out)
        out += bytes
    }
}
