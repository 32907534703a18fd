import Contracts
import Foundation
import GRDB
import NIOCore
import NIOPosix
import RPC
import ServiceRuntime
import Synchronization
import Testing
import TestSupport

/// The directory holding the built executables (next to the test bundle).
let binDirectory: URL = {
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    var dir = exe.deletingLastPathComponent()
    // Linux: .build/<triple>/debug/ArbiterPackageTests.xctest is a file in the debug directory.
    while !FileManager.default.fileExists(atPath: dir.appendingPathComponent("arbiter-echo").path), dir.path != "/" {
        dir = dir.deletingLastPathComponent()
    }
    return dir
}()


struct RunningProcess {
    let process: Process
    let stderr: Pipe
    /// Standard output, when captured (small outputs only: nothing drains it while running).
    var stdout: Pipe?

    static func start(_ name: String, _ arguments: [String], environment: [String: String] = [:],
                      captureOutput: Bool = false) throws -> RunningProcess {
        let process = Process()
        process.executableURL = binDirectory.appendingPathComponent(name)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("ARBITER_") }
        env.merge(environment) { _, new in new }
        process.environment = env
        let stderr = Pipe()
        process.standardError = stderr
        let stdout = captureOutput ? Pipe() : nil
        process.standardOutput = stdout ?? FileHandle.nullDevice
        try process.run()
        return RunningProcess(process: process, stderr: stderr, stdout: stdout)
    }

    func waitForExit() async -> Int32 {
        while process.isRunning { try? await Task.sleep(for: .milliseconds(20)) }
        return process.terminationStatus
    }

    /// Everything the process wrote to standard output, when captured (call after it exited).
    var output: String {
        get async {
            guard let handle = stdout?.fileHandleForReading else { return "" }
            return (try? await offPool { String(decoding: handle.readDataToEndOfFile(), as: UTF8.self) }) ?? ""
        }
    }

    /// Everything the process wrote to standard error (call after it exited).
    var errorOutput: String {
        get async {
            let handle = stderr.fileHandleForReading
            return (try? await offPool { String(decoding: handle.readDataToEndOfFile(), as: UTF8.self) }) ?? ""
        }
    }
}

/// GET http://127.0.0.1:port/path with curl: (status, body).
func httpGet(port: Int, _ path: String) async throws -> (Int, String) {
    try await offPool { try httpGetBlocking(port: port, path) }
}

func httpGetBlocking(port: Int, _ path: String) throws -> (Int, String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
    process.arguments = ["-s", "-w", "\n%{http_code}", "http://127.0.0.1:\(port)\(path)"]
    let out = Pipe()
    process.standardOutput = out
    try process.run()
    let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    let status = Int(text.split(separator: "\n").last ?? "") ?? 0
    return (status, String(text[..<(text.lastIndex(of: "\n") ?? text.endIndex)]))
}

/// Waits until the server on `port` answers Health/Check with SERVING. When it does not,
/// and `process` is given, the error carries whether it is still running and the end of
/// what it wrote to standard error (the process is killed to read it).
func waitUntilServing(port: Int, process: RunningProcess? = nil) async throws -> RPCClient {
    let client = RPCClient(host: "127.0.0.1", port: port)
    for _ in 0..<200 {
        if let status = try? await client.call(HealthV1.Health.check, HealthV1.HealthCheckRequest()).status, status == .serving {
            return client
        }
        try await Task.sleep(for: .milliseconds(25))
    }
    client.close()
    guard let process else { throw RPCError(.unavailable, "server on \(port) never became healthy") }
    let running = process.process.isRunning
    kill(process.process.processIdentifier, SIGKILL)
    _ = await process.waitForExit()
    let log = await process.errorOutput
    throw RPCError(.unavailable, "server on \(port) never became healthy (\(running ? "still running" : "exited \(process.process.terminationStatus)")); its log ends:\n\(log.suffix(2000))")
}

/// The four services as processes, wired as in production (profile follows identity;
/// routing reads both; decision calls all three), each serving before the next starts.
struct WiredSuite {
    /// In the order they start (each needs the ones before it).
    static let names = ["identity", "profile", "routing", "decision"]
    var processes: [String: RunningProcess] = [:]
    var clients: [String: RPCClient] = [:]

    /// Starts them with stores under `dataDir/<name>` and `arguments` added to each one's.
    static func start(dataDir: String, arguments extra: [String]) async throws -> WiredSuite {
        var ports: [String: Int] = [:]
        for name in names { ports[name] = try await unusedPort() }
        var suite = WiredSuite()
        do {
            for (i, name) in names.enumerated() {
                var arguments = ["--port", "\(ports[name]!)", "--admin-port", "\(try await unusedPort())",
                                 "--data-dir", dataDir + "/" + name] + extra
                for peer in names[..<i] { arguments += ["--\(peer)", "127.0.0.1:\(ports[peer]!)"] }
                let process = try RunningProcess.start("arbiter-\(name)", arguments)
                suite.processes[name] = process
                suite.clients[name] = try await waitUntilServing(port: ports[name]!, process: process)
            }
        } catch {
            suite.kill()
            throw error
        }
        return suite
    }

    /// Kills every process (SIGKILL) and closes the clients: for `defer`.
    func kill() {
        for process in processes.values { Foundation.kill(process.process.processIdentifier, SIGKILL) }
        clients.values.forEach { $0.close() }
    }

    /// Sends each SIGTERM, the last started first; the exit statuses by name.
    func stop() async -> [String: Int32] {
        for name in Self.names.reversed() { Foundation.kill(processes[name]!.process.processIdentifier, SIGTERM) }
        var statuses: [String: Int32] = [:]
        for name in Self.names { statuses[name] = await processes[name]!.waitForExit() }
        return statuses
    }
}

/// The runtime's report of a process that crashed: the fatal error and the crashed thread's
/// stack, from what it wrote to standard error (call after it exited).
extension RunningProcess {
    var crashReport: String {
        get async {
            let log = await errorOutput
            let start = log.range(of: "Fatal error")?.lowerBound ?? log.range(of: "crashed:")?.lowerBound ?? log.startIndex
            return String(log[start...].prefix(6000))
        }
    }
}

@Suite("executables: operator contract and lifecycle", .serialized)
struct ProcessTests {
    @Test("SIGTERM drains: the call in flight is answered, readiness drops, the process exits 0")
    func sigtermDrains() async throws {
        let port = try await unusedPort(), admin = try await unusedPort()
        let dataDir = temporaryDirectory("sigterm")
        // Configured through the environment only. NIO's strict mode turns misuse it would
        // only print about (work scheduled on an event loop already shut down) into a crash.
        let server = try RunningProcess.start("arbiter-echo", [], environment: [
            "ARBITER_PORT": "\(port)", "ARBITER_ADMIN_PORT": "\(admin)", "ARBITER_DATA_DIR": dataDir,
            "ARBITER_LOG_FORMAT": "json", "SWIFTNIO_STRICT": "1",
        ])
        let client = try await waitUntilServing(port: port)
        defer { client.close() }
        var isDir: ObjCBool = false
        #expect(FileManager.default.fileExists(atPath: dataDir, isDirectory: &isDir) && isDir.boolValue)

        #expect(try await httpGet(port: admin, "/readyz") == (200, "ready\n"))
        #expect(try await httpGet(port: admin, "/healthz") == (200, "ok\n"))
        let metrics = try await httpGet(port: admin, "/metrics").1
        #expect(metrics.contains("rpc_server_requests_total{rpc_service=\"grpc.health.v1.Health\",rpc_method=\"Check\",rpc_code=\"OK\"}"))
        // Codes a client chose, past gRPC's: one series, however many codes (before, each made
        // its own, for as long as the process ran).
        for code: Int32 in [17, 18, 99_999] {
            var failing = EchoV1.EchoRequest()
            failing.failCode = code
            await #expect(throws: RPCError.self) { _ = try await client.call(EchoV1.Echo.echo, failing) }
        }
        let other = try await httpGet(port: admin, "/metrics").1.split(separator: "\n").filter { $0.hasPrefix("rpc_server_requests_total{") && $0.contains("Echo") }
        #expect(other == ["rpc_server_requests_total{rpc_service=\"arbiter.echo.v1.Echo\",rpc_method=\"Echo\",rpc_code=\"OTHER\"} 3"], "\(other)")
        // A call past its deadline is counted once, when it is answered DEADLINE_EXCEEDED, not
        // again when its handler finishes later.
        var late = EchoV1.EchoRequest()
        late.delayMs = 300
        await #expect(throws: RPCError.self) { _ = try await client.call(EchoV1.Echo.echo, late, timeout: .milliseconds(50)) }
        func series(_ code: String) async throws -> [Substring] {
            try await httpGet(port: admin, "/metrics").1.split(separator: "\n")
                .filter { $0.hasPrefix("rpc_server_requests_total{") && $0.contains("Echo") && $0.contains("rpc_code=\"\(code)\"") }
        }
        #expect(try await eventually {
            try await httpGet(port: admin, "/metrics").1.split(separator: "\n").contains { $0 == "rpc_server_in_flight_requests 0" || $0 == "rpc_server_in_flight_requests 0.0" }
        })
        try await Task.sleep(for: .milliseconds(400))  // past the handler's end
        let deadline = try await series("DEADLINE_EXCEEDED")
        #expect(deadline.count == 1 && deadline.first?.hasSuffix("} 1") == true, "\(deadline)")
        #expect(try await series("OK").isEmpty)

        var request = EchoV1.EchoRequest()
        request.message = "in flight"
        request.delayMs = 1500
        async let slow = client.call(EchoV1.Echo.echo, request)
        // SIGTERM once the call is in flight on the server (a fixed sleep races a loaded host).
        #expect(try await eventually {
            try await httpGet(port: admin, "/metrics").1.split(separator: "\n")
                .contains { $0.hasPrefix("rpc_server_in_flight_requests ") && (Double($0.split(separator: " ").last ?? "") ?? 0) > 0 }
        })
        kill(server.process.processIdentifier, SIGTERM)
        try await Task.sleep(for: .milliseconds(150))
        #expect(try await httpGet(port: admin, "/readyz").0 == 503)
        #expect(try await slow.message == "in flight")
        #expect(await server.waitForExit() == 0)
        let log = await server.errorOutput
        #expect(log.contains("\"message\":\"rpc server draining\""))
    }

    @Test("a bad flag or environment value stops the process at start, naming it", arguments: [
        (["--port", "70000"], [String: String](), "--port"),
        ([], ["ARBITER_ADMIN_PORT": "http"], "--admin-port"),
        (["--identity", "nohost"], [:], "--identity"),
        (["--auth-token-file", "/nonexistent/token"], [:], "--auth-token-file"),
        (["--log-level", "loud"], [:], "--log-level"),
        (["--max-in-flight", "0"], [:], "--max-in-flight"),
        // A pid that is not the parent (one left in the environment) would stop it at once.
        ([], ["ARBITER_PARENT_PID": "1"], "--parent-pid: 1 is not this process's parent"),
    ])
    func badConfiguration(arguments: [String], environment: [String: String], flag: String) async throws {
        let process = try RunningProcess.start("arbiter-identity", arguments + ["--data-dir", temporaryDirectory("bad-flag")],
                                               environment: environment)
        let status = await process.waitForExit()
        #expect(status != 0)
        #expect(await process.errorOutput.contains(flag))
    }

    @Test("with --auth-token-file, calls need the token; health does not", .timeLimit(.minutes(1)))
    func authTokenFile() async throws {
        let port = try await unusedPort(), admin = try await unusedPort()
        let tokenFile = temporaryDirectory("auth") + "/token"
        try "  t0ken\n".write(toFile: tokenFile, atomically: true, encoding: .utf8)
        let server = try RunningProcess.start("arbiter-echo", [
            "--port", "\(port)", "--admin-port", "\(admin)", "--auth-token-file", tokenFile,
            "--data-dir", temporaryDirectory("auth-data"),
        ])
        let anonymous = try await waitUntilServing(port: port)
        let authorized = RPCClient(host: "127.0.0.1", port: port, configuration: .withToken("t0ken"))
        defer { anonymous.close(); authorized.close() }
        do {
            _ = try await anonymous.call(EchoV1.Echo.echo, EchoV1.EchoRequest())
            Issue.record("expected UNAUTHENTICATED")
        } catch {
            #expect(error.code == .unauthenticated)
        }
        #expect(try await authorized.call(EchoV1.Echo.echo, EchoV1.EchoRequest()).message == "")
        kill(server.process.processIdentifier, SIGINT)
        #expect(await server.waitForExit() == 0)
    }

    @Test("arbiter-identity serves the identity graph over the wire, from its own store, across a kill -9")
    func identityOverTheWire() async throws {
        let port = try await unusedPort(), admin = try await unusedPort()
        let dataDir = temporaryDirectory("identity")
        let configFile = dataDir + "-config.json"
        try #"{"identity": {"default_region": "NL", "limits": {"customer_id": 1}}}"#.write(toFile: configFile, atomically: true, encoding: .utf8)
        let arguments = ["--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", dataDir, "--config", configFile]
        var server = try RunningProcess.start("arbiter-identity", arguments)
        var client = try await waitUntilServing(port: port, process: server)
        var link = IdentityV1.LinkRequest()
        var phone = CommonV1.Identifier()
        phone.type = "phone"
        phone.value = "06 1234 5678"
        link.identifiers = [phone]
        link.source = "test"
        let linked = try await client.call(IdentityV1.Identity.link, link)
        #expect(linked.personId.hasPrefix("p_"))
        // An acknowledged write survives kill -9.
        kill(server.process.processIdentifier, SIGKILL)
        _ = await server.waitForExit()
        client.close()
        server = try RunningProcess.start("arbiter-identity", arguments)
        client = try await waitUntilServing(port: port, process: server)
        var get = IdentityV1.GetPersonRequest()
        get.personId = linked.personId
        let person = try await client.call(IdentityV1.Identity.getPerson, get)
        #expect(person.identifiers.first?.identifier?.value == "+31612345678")
        client.close()
        kill(server.process.processIdentifier, SIGTERM)
        #expect(await server.waitForExit() == 0)
    }

    @Test("a second process of a service on the same data directory is refused at start, naming the first; a kill -9 frees it")
    func dataDirectoryLocked() async throws {
        let dataDir = temporaryDirectory("locked")
        let (port, admin) = (try await unusedPort(), try await unusedPort())
        let first = try RunningProcess.start("arbiter-identity", ["--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", dataDir])
        defer { kill(first.process.processIdentifier, SIGKILL) }
        try await waitUntilServing(port: port, process: first).close()
        let (otherPort, otherAdmin) = (try await unusedPort(), try await unusedPort())
        let second = try RunningProcess.start("arbiter-identity", ["--port", "\(otherPort)", "--admin-port", "\(otherAdmin)", "--data-dir", dataDir])
        #expect(await second.waitForExit() != 0)
        let errors = await second.errorOutput
        #expect(errors.contains("--data-dir: \(dataDir) is in use by another arbiter-identity (pid \(first.process.processIdentifier))"), "\(errors)")
        // Another service may share the directory: its lock and store are its own.
        let profilePort = try await unusedPort(), profileAdmin = try await unusedPort()
        let profile = try RunningProcess.start("arbiter-profile", ["--port", "\(profilePort)", "--admin-port", "\(profileAdmin)", "--data-dir", dataDir])
        defer { kill(profile.process.processIdentifier, SIGKILL) }
        try await waitUntilServing(port: profilePort, process: profile).close()
        // The kernel drops the lock with the process, however it ends.
        kill(first.process.processIdentifier, SIGKILL)
        _ = await first.waitForExit()
        let third = try RunningProcess.start("arbiter-identity", ["--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", dataDir])
        defer { kill(third.process.processIdentifier, SIGKILL) }
        try await waitUntilServing(port: port, process: third).close()
    }

    @Test("while its store opens (here: held by another writer), a service answers /healthz, and /readyz says not ready; then it serves")
    func healthWhileOpeningTimed() async throws {
        let (server, port, admin, healthy, release) = try await identityOnHeldStore("opening")
        defer { release(); kill(server.process.processIdentifier, SIGKILL) }
        let ready = try await httpGet(port: admin, "/readyz").0
        let listening = !portIsFree(port)
        release()
        #expect(healthy, "/healthz while the store was held")
        #expect(ready == 503)
        #expect(!listening, "the RPC port listens only once the store is open")
        try await waitUntilServing(port: port, process: server).close()
        #expect(try await httpGet(port: admin, "/readyz").0 == 200)
    }

    @Test("SIGTERM while the store opens ends the process at once, with status 0")
    func sigtermWhileOpeningTimed() async throws {
        let (server, _, _, healthy, release) = try await identityOnHeldStore("opening-stop")
        defer { release(); kill(server.process.processIdentifier, SIGKILL) }
        #expect(healthy)
        kill(server.process.processIdentifier, SIGTERM)
        #expect(await server.waitForExit() == 0)  // the lock is still held: it did not wait for the store
        #expect(await server.errorOutput.contains("stopping while the stores open"))
    }

    /// arbiter-identity started on a new store whose write lock another writer holds, so its
    /// migration waits (SQLite's busy timeout, 5 s) as a long recovery would. Returned once
    /// its /healthz answers 200 (`healthy`), or it exited, or 3 s passed; `release` lets the
    /// store open.
    func identityOnHeldStore(_ name: String) async throws
        -> (server: RunningProcess, port: Int, admin: Int, healthy: Bool, release: @Sendable () -> Void) {
        let port = try await unusedPort(), admin = try await unusedPort()
        let dataDir = temporaryDirectory(name)
        let release = try await holdWriteLock(dataDir + "/identity.sqlite")
        do {
            let server = try RunningProcess.start("arbiter-identity", ["--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", dataDir])
            let answered = try await eventually(3) {
                guard server.process.isRunning else { return true }
                return (try? await httpGet(port: admin, "/healthz"))?.0 == 200
            }
            return (server, port, admin, answered && server.process.isRunning, release)
        } catch {
            release()
            throw error
        }
    }

    @Test("arbiter-profile resolves identifiers through arbiter-identity, follows its merges, keeps acknowledged events across a kill -9, and writes its feature states when stopped")
    func profileWithIdentity() async throws {
        let identityPort = try await unusedPort(), identityAdmin = try await unusedPort()
        let port = try await unusedPort(), admin = try await unusedPort()
        let dataDir = temporaryDirectory("profile")
        let identity = try RunningProcess.start("arbiter-identity", [
            "--port", "\(identityPort)", "--admin-port", "\(identityAdmin)", "--data-dir", dataDir + "/identity"])
        defer { kill(identity.process.processIdentifier, SIGKILL) }
        let identityClient = try await waitUntilServing(port: identityPort)
        defer { identityClient.close() }
        let arguments = ["--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", dataDir + "/profile",
                         "--identity", "127.0.0.1:\(identityPort)"]
        var server = try RunningProcess.start("arbiter-profile", arguments)
        var client = try await waitUntilServing(port: port, process: server)

        var define = ProfileV1.DefineFeatureRequest()
        var feature = ProfileV1.FeatureDefinition()
        feature.name = "views"
        feature.eventType = "view"
        feature.aggregation = .count
        define.feature = feature
        _ = try await client.call(ProfileV1.Profile.defineFeature, define)
        var track = ProfileV1.TrackRequest()
        track.events = (0..<6).map { i in
            var event = ProfileV1.Event()
            event.eventId = "ev-\(i)"
            event.type = "view"
            event.person = i < 4 ? personRef(identifier("cookie_id", "ck-9")) : personRef(identifier("email", "Zoe@Example.org"))
            return event
        }
        let tracked = try await client.call(ProfileV1.Profile.track, track)
        #expect(tracked.accepted == 6, "\(tracked)")
        var bad = track
        bad.events[0].person = personRef(identifier("email", "not an email"))
        bad.events[0].eventId = "ev-bad"
        let rejected = try await client.call(ProfileV1.Profile.track, bad)
        #expect(rejected.rejections.first?.reason.contains("identifiers[0].value") == true, "\(rejected)")

        // The identity service learns that the cookie and the email are one person.
        var link = IdentityV1.LinkRequest()
        link.identifiers = [identifier("cookie_id", "ck-9"), identifier("email", "zoe@example.org")]
        let linked = try await identityClient.call(IdentityV1.Identity.link, link)
        #expect(linked.mergedPersonIds.count == 1)
        var get = ProfileV1.GetProfileRequest()
        get.person = personRef(identifier("email", "zoe@example.org"))
        var views = 0.0
        for _ in 0..<100 {  // the follower polls once a second
            views = try await client.call(ProfileV1.Profile.getProfile, get).features.first?.value ?? 0
            if views == 6 { break }
            try await Task.sleep(for: .milliseconds(100))
        }
        #expect(views == 6)

        kill(server.process.processIdentifier, SIGKILL)
        _ = await server.waitForExit()
        client.close()
        server = try RunningProcess.start("arbiter-profile", arguments)
        client = try await waitUntilServing(port: port, process: server)
        let profile = try await client.call(ProfileV1.Profile.getProfile, get)
        #expect(profile.personId == linked.personId && profile.features.first?.value == 6)
        #expect(try await client.call(ProfileV1.Profile.track, track).duplicates == 6)
        var more = track
        more.events = [track.events[5]]
        more.events[0].eventId = "ev-after-restart"
        #expect(try await client.call(ProfileV1.Profile.track, more).accepted == 1)
        client.close()
        kill(server.process.processIdentifier, SIGTERM)
        #expect(await server.waitForExit() == 0)
        // A graceful stop writes the feature states it kept in memory: nothing is left to
        // recompute at the next start, and the state file counts the last event.
        let events = try DatabaseQueue(path: dataDir + "/profile/profile.sqlite")
        #expect(try await events.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM dirty_person") } == 0)
        let states = try DatabaseQueue(path: dataDir + "/profile/profile-state.sqlite")
        let stored = try await states.read { db in
            try Data.fetchOne(db, sql: "SELECT state FROM person_state WHERE person_id = ?", arguments: [linked.personId])
        }
        #expect(try stored.map { try ProfileStoreV1.PersonState(serializedBytes: $0).events } == 7)
    }

    @Test("arbiter-decision keeps answering with arbiter-profile killed, degraded and within known consent, and keeps its log and its offers (caps) across a kill -9")
    func decisionWithProfileKilled() async throws {
        let profilePort = try await unusedPort(), profileAdmin = try await unusedPort()
        let port = try await unusedPort(), admin = try await unusedPort()
        let dataDir = temporaryDirectory("decision")
        // Generous peer timeouts, so that a loaded machine cannot fail the healthy decision.
        let config = dataDir + "/config.json"
        try Data(#"{"decision": {"decideBudgetMs": 3000, "peerTimeoutMs": 2000}}"#.utf8).write(to: URL(fileURLWithPath: config))
        let profile = try RunningProcess.start("arbiter-profile", [
            "--port", "\(profilePort)", "--admin-port", "\(profileAdmin)", "--data-dir", dataDir + "/profile"])
        defer { kill(profile.process.processIdentifier, SIGKILL) }
        let profileClient = try await waitUntilServing(port: profilePort)
        defer { profileClient.close() }
        let arguments = ["--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", dataDir + "/decision",
                         "--profile", "127.0.0.1:\(profilePort)", "--config", config]
        var server = try RunningProcess.start("arbiter-decision", arguments)
        var client = try await waitUntilServing(port: port, process: server)

        let person = personRef("p1")
        var record = ProfileV1.ConsentRecord()
        record.purpose = "marketing"
        record.channel = .email
        record.granted = true
        var consent = ProfileV1.SetConsentRequest()
        consent.person = person
        consent.consents = [record]
        _ = try await profileClient.call(ProfileV1.Profile.setConsent, consent)
        for (id, safe) in [("needs-consent", false), ("safe", true)] {
            var upsert = DecisionV1.UpsertActionRequest()
            var action = DecisionV1.Action()
            action.id = id
            action.value = 10
            action.channels = [.email]
            action.consentPurpose = "marketing"
            action.safeWithoutConsent = safe
            if safe {  // two a day: both decisions below offer it
                var cap = DecisionV1.Cap()
                cap.scope = .action
                cap.max = 2
                cap.windowSeconds = 86_400
                action.caps = [cap]
            }
            upsert.action = action
            _ = try await client.call(DecisionV1.Decision.upsertAction, upsert)
        }
        var decide = DecisionV1.DecideRequest()
        decide.person = person
        decide.placement = "home"
        decide.count = 2
        let healthy = try await client.call(DecisionV1.Decision.decide, decide)
        #expect(!healthy.degraded, "\(healthy.degradedReasons)")
        #expect(Set(healthy.actions.map(\.actionId)) == ["needs-consent", "safe"])

        kill(profile.process.processIdentifier, SIGKILL)
        _ = await profile.waitForExit()
        let degraded = try await client.call(DecisionV1.Decision.decide, decide, timeout: .seconds(5))
        #expect(degraded.degraded && degraded.degradedReasons.first?.hasPrefix("profile: ") == true, "\(degraded.degradedReasons)")
        #expect(degraded.actions.map(\.actionId) == ["safe"])

        // Both decisions were acknowledged, so both survive a kill -9 of the decision service.
        kill(server.process.processIdentifier, SIGKILL)
        _ = await server.waitForExit()
        client.close()
        server = try RunningProcess.start("arbiter-decision", arguments)
        client = try await waitUntilServing(port: port, process: server)
        for decision in [healthy, degraded] {
            var get = DecisionV1.GetDecisionRequest()
            get.decisionId = decision.decisionId
            let logged = try await client.call(DecisionV1.Decision.getDecision, get)
            #expect(logged.actions == decision.actions && logged.degraded == decision.degraded)
        }
        // The restarted service read its recent offers back: the cap of two is taken.
        decide.explain = true
        let capped = try await client.call(DecisionV1.Decision.decide, decide, timeout: .seconds(5))
        #expect(capped.actions.isEmpty)
        #expect(capped.explanations.first { $0.actionId == "safe" }?.excludedBy == "cap: at most 2 offers of this action per 86400 s",
                "\(capped.explanations)")
        client.close()
        kill(server.process.processIdentifier, SIGTERM)
        #expect(await server.waitForExit() == 0)
    }

    @Test("arbiter-routing: after a kill -9 during dispatch and a restart, every accepted delivery is sent; the sink keeps one per key")
    func routingKilledDuringDispatch() async throws {
        let profilePort = try await unusedPort(), profileAdmin = try await unusedPort()
        let port = try await unusedPort(), admin = try await unusedPort()
        let dataDir = temporaryDirectory("routing")
        // A slow receiver and few senders: the kill lands while deliveries are in flight.
        let sink = try await WebhookSink.start()
        // After 20 answers the sink hangs: the 4 senders stop with at most 24 requests received,
        // so the kill lands mid-dispatch however slow the machine (a 100 ms delay per answer
        // was not enough: once the 200 Route calls took over 5 s under the parallel suite).
        sink.holdResponses(after: 20)
        let config = dataDir + "/config.json"
        try Data("""
            {"routing": {"webhook": {"url": "http://127.0.0.1:\(sink.port)/hooks"}, "dispatchConcurrency": 4,
                         "initialBackoffMs": 20, "maxBackoffMs": 100}}
            """.utf8).write(to: URL(fileURLWithPath: config))
        let profile = try RunningProcess.start("arbiter-profile", [
            "--port", "\(profilePort)", "--admin-port", "\(profileAdmin)", "--data-dir", dataDir + "/profile"])
        defer { kill(profile.process.processIdentifier, SIGKILL) }
        let profileClient = try await waitUntilServing(port: profilePort)
        defer { profileClient.close() }
        let persons = (0..<20).map { "p\($0)" }
        for person in persons {
            var record = ProfileV1.ConsentRecord()
            record.purpose = "ops"
            record.channel = .webhook
            record.granted = true
            var consent = ProfileV1.SetConsentRequest()
            consent.person = personRef(person)
            consent.consents = [record]
            _ = try await profileClient.call(ProfileV1.Profile.setConsent, consent)
        }
        let arguments = ["--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", dataDir + "/routing",
                         "--profile", "127.0.0.1:\(profilePort)", "--config", config]
        var server = try RunningProcess.start("arbiter-routing", arguments)
        var client = try await waitUntilServing(port: port, process: server)

        let keys = Set((0..<200).map { "key-\($0)" })
        for i in 0..<200 {
            var route = RoutingV1.RouteRequest()
            route.person = personRef(persons[i % persons.count])
            var message = RoutingV1.Message()
            message.templateId = "notice"
            route.message = message
            route.allowedChannels = [.webhook]
            route.urgency = .critical
            route.purpose = "ops"
            route.idempotencyKey = "key-\(i)"
            let delivery = try await client.call(RoutingV1.Routing.route, route)
            #expect(delivery.state == .scheduled, "\(delivery.suppressionReason) \(delivery.suppressionDetail)")
        }
        #expect(try await eventually(30) { sink.answered >= 20 })
        kill(server.process.processIdentifier, SIGKILL)
        _ = await server.waitForExit()
        client.close()
        let beforeRestart = sink.distinctKeys.count
        #expect(beforeRestart < keys.count, "the kill came too late to test anything")
        sink.holdResponses(after: nil)

        server = try RunningProcess.start("arbiter-routing", arguments)
        client = try await waitUntilServing(port: port, process: server)
        #expect(try await eventually(60) { sink.distinctKeys.count == keys.count })
        #expect(sink.distinctKeys == Set(keys.map { "\($0):webhook" }))
        // The sink records a request before it answers: the last results are being recorded.
        let restarted = client
        #expect(try await eventually(10) {
            var sent = 0
            for person in persons {
                var list = RoutingV1.ListDeliveriesRequest()
                list.personId = person
                sent += try await restarted.call(RoutingV1.Routing.listDeliveries, list).deliveries.filter { $0.state == .sent }.count
            }
            return sent == keys.count
        })
        client.close()
        kill(server.process.processIdentifier, SIGTERM)
        #expect(await server.waitForExit() == 0)
        await sink.close()
    }

    @Test("a bad --config section stops arbiter-identity at start, naming the setting")
    func badIdentityConfig() async throws {
        let configFile = temporaryDirectory("bad-config") + "/config.json"
        try #"{"identity": {"default_region": "Atlantis"}}"#.write(toFile: configFile, atomically: true, encoding: .utf8)
        let (port, admin) = (try await unusedPort(), try await unusedPort())
        let ports = ["--port", "\(port)", "--admin-port", "\(admin)"]
        let process = try RunningProcess.start("arbiter-identity", ports + ["--config", configFile, "--data-dir", temporaryDirectory("bad-config-data")])
        #expect(await process.waitForExit() != 0)
        #expect(await process.errorOutput.contains("identity.default_region"))
        // A key the section does not know (here camelCase for snake_case: the privacy key would
        // be left unset, and identifiers stored in the clear), and a section that is not an
        // object (before, a crash with a backtrace).
        for (config, message) in [(#"{"identity": {"privacyKeyFile": "/run/secrets/key"}}"#, "--config: identity.privacyKeyFile: unknown key"),
                                  (#"{"identity": null}"#, "--config: identity: must be an object")] {
            try config.write(toFile: configFile, atomically: true, encoding: .utf8)
            let refused = try RunningProcess.start("arbiter-identity", ports + ["--config", configFile, "--data-dir", temporaryDirectory("bad-config-data")])
            #expect(await refused.waitForExit() != 0)
            let output = await refused.errorOutput
            #expect(output.contains(message), "\(output)")
        }
    }

    @Test("arbiter-decision will not start with a log retention shorter than a stored cap window")
    func decisionRetentionConflict() async throws {
        let port = try await unusedPort(), admin = try await unusedPort()
        let dataDir = temporaryDirectory("retention")
        let arguments = ["--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", dataDir]
        let server = try RunningProcess.start("arbiter-decision", arguments)
        let client = try await waitUntilServing(port: port, process: server)
        var cap = DecisionV1.Cap()
        cap.scope = .action
        cap.max = 3
        cap.windowSeconds = 30 * 86_400
        var upsert = DecisionV1.UpsertActionRequest()
        upsert.action = DecisionV1.Action()
        upsert.action?.id = "weekly-offer"
        upsert.action?.value = 1
        upsert.action?.caps = [cap]
        _ = try await client.call(DecisionV1.Decision.upsertAction, upsert)
        client.close()
        kill(server.process.processIdentifier, SIGTERM)
        #expect(await server.waitForExit() == 0)

        let config = dataDir + "/config.json"
        try Data(#"{"decision": {"logRetentionDays": 10}}"#.utf8).write(to: URL(fileURLWithPath: config))
        let refused = try RunningProcess.start("arbiter-decision", arguments + ["--config", config])
        #expect(await refused.waitForExit() != 0)
        #expect(await refused.errorOutput.contains("decision.logRetentionDays 10 is shorter than windows in the catalog, which would count deleted offers: weekly-offer: action.caps[0].window_seconds is 2592000 s"))
    }

    @Test("every service executable serves health on its port")
    func servicesServeHealth() async throws {
        for name in ["arbiter-identity", "arbiter-profile", "arbiter-decision", "arbiter-routing"] {
            let port = try await unusedPort(), admin = try await unusedPort()
            let server = try RunningProcess.start(name, [
                "--port", "\(port)", "--admin-port", "\(admin)", "--data-dir", temporaryDirectory(name),
            ])
            let client = try await waitUntilServing(port: port)
            client.close()
            kill(server.process.processIdentifier, SIGTERM)
            #expect(await server.waitForExit() == 0, "\(name)")
        }
    }
}

@Suite("operator flags")
struct OptionsTests {
    enum Fake: ServiceDefinition {
        static let commandName = "arbiter-fake"
        static let abstract = "test"
        static let defaultPort = 7999
        static let defaultAdminPort = 8999
        static func makeServices(_ context: ServiceContext) async throws -> ServiceParts { ServiceParts() }
    }

    @Test("environment fills in flags not given; the command line wins")
    func environment() throws {
        let arguments = ServiceOptions<Fake>.arguments(["--port", "1234"], environment: [
            "ARBITER_PORT": "9", "ARBITER_DATA_DIR": "/var/lib/arbiter", "ARBITER_IDENTITY": "id:7101", "HOME": "/root",
        ])
        let options = try ServiceOptions<Fake>.parse(arguments)
        #expect(options.port == 1234)
        #expect(options.dataDir == "/var/lib/arbiter")
        #expect(options.identity == PeerAddress(host: "id", port: 7101))
        #expect(options.adminPort == 8999)
    }

    @Test("defaults come from the service definition")
    func defaults() throws {
        let options = try ServiceOptions<Fake>.parse([])
        #expect(options.port == 7999 && options.host == "127.0.0.1" && options.maxMessageSize == 4 << 20)
    }
}
