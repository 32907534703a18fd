import ArgumentParser
import Contracts
import Foundation
import NIOCore
import NIOPosix
import RPC
import Synchronization
import UnixSignals

/// `arbiter`: runs and drives the suite.
@main
struct Arbiter: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "arbiter", abstract: "Run the Arbiter suite on this machine, and call it.",
        subcommands: [Up.self, Demo.self, Call.self, List.self, Load.self])
}

/// `arbiter up`: the four services as child processes on localhost, each with its store
/// under one data directory, wired by address; waits until all serve, prints where they
/// are, and stops them gracefully on Ctrl-C (SIGINT) or SIGTERM. If one of them exits on
/// its own, the others are stopped and `up` fails with that service's log.
struct Up: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start identity, profile, routing and decision (building any that are missing); Ctrl-C stops them.")

    @Option(help: "Directory holding each service's store (<dir>/<service>) and log (<dir>/<service>.log).")
    var dataDir = "./data"
    @Option(help: "Interface the services listen on.") var host = "127.0.0.1"
    @Option(help: "RPC ports are base+1 (identity), +2 (profile), +3 (decision), +4 (routing).") var portBase = 7100
    @Option(help: "Admin (HTTP) ports likewise.") var adminPortBase = 8100
    @Option(help: "JSON settings file passed to every service (--config).") var config: String?
    @Option(help: "Token file passed to every service (--auth-token-file).") var authTokenFile: String?
    @Option(help: "Log level of the services.") var logLevel = "info"
    @Option(help: "Directory of the arbiter-* executables (default: next to this one).") var binDir: String?
    @Option(help: "Seconds to wait for every service to serve.") var startTimeout = 60.0
    @Option(help: "Seconds each service is given to stop (it drains its calls for up to 10 s) before it is killed.") var stopTimeout = 20.0

    /// The services in start order, with their port offset and the peers they are given.
    static let services: [(name: String, offset: Int, peers: [String])] = [
        ("identity", 1, []), ("profile", 2, ["identity"]), ("routing", 4, ["identity", "profile"]),
        ("decision", 3, ["identity", "profile", "routing"]),
    ]

    func validate() throws {
        guard stopTimeout > 0, startTimeout > 0 else { throw ValidationError("--start-timeout and --stop-timeout must be positive") }
        guard (1...65_000).contains(portBase), (1...65_000).contains(adminPortBase) else {
            throw ValidationError("--port-base and --admin-port-base must leave room for four ports below 65536")
        }
    }

    /// Builds the service executables missing from `bin` when run from the package (as
    /// `swift run arbiter up` does: it builds only `arbiter`), in `bin`'s configuration.
    func buildIfNeeded(_ bin: String, interrupted: Interrupted) throws {
        let missing = Self.services.map { "arbiter-\($0.name)" }.filter { !FileManager.default.isExecutableFile(atPath: bin + "/" + $0) }
        guard !missing.isEmpty else { return }
        // Only when this arbiter was built from the package in the current directory.
        let here = FileManager.default.currentDirectoryPath
        guard binDir == nil, FileManager.default.fileExists(atPath: "Package.swift"), bin.hasPrefix(here + "/.build/") else {
            throw ValidationError("\(missing.joined(separator: ", ")) not found in \(bin); build them (swift build -c release) or pass --bin-dir")
        }
        let configuration = URL(fileURLWithPath: bin).lastPathComponent == "release" ? "release" : "debug"
        for product in missing {
            say("building \(product) (\(configuration))")
            let build = Process()
            build.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            build.arguments = ["swift", "build", "-c", configuration, "--product", product]
            try build.run()
            // swift build runs in its own process group, which the terminal's Ctrl-C does not
            // reach: passed on from here.
            while build.isRunning {
                if interrupted.isSet {
                    // Children inherit SIGINT blocked and ignored (as this process traps it):
                    // should swift build not stop on it, it is killed.
                    build.interrupt()
                    let end = ContinuousClock.now + .seconds(5)
                    while build.isRunning && ContinuousClock.now < end { Thread.sleep(forTimeInterval: 0.05) }
                    if build.isRunning { kill(build.processIdentifier, SIGKILL) }
                    build.waitUntilExit()
                    throw ExitCode(130)
                }
                Thread.sleep(forTimeInterval: 0.05)
            }
            guard build.terminationStatus == 0, FileManager.default.isExecutableFile(atPath: bin + "/" + product) else {
                throw ValidationError("building \(product) failed (swift build -c \(configuration) --product \(product))")
            }
        }
    }

    func run() async throws {
        // Trap the signals before any child starts: a Ctrl-C while building or starting stops
        // the build, or the children started so far, too.
        let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm)
        let interrupted = Interrupted()
        let watcher = Task { for await _ in signals { interrupted.set() } }
        defer { watcher.cancel() }
        let bin = binDir ?? URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent().path
        try FileManager.default.createDirectory(atPath: dataDir, withIntermediateDirectories: true)
        try buildIfNeeded(bin, interrupted: interrupted)
        // Read before any child starts: nothing after this may leave children running unless
        // it stops them (each child also stops by itself once this process is gone: --parent-pid).
        let token: String?
        if let authTokenFile {
            guard let data = FileManager.default.contents(atPath: authTokenFile) else { throw ValidationError("--auth-token-file: cannot read \(authTokenFile)") }
            guard let text = String(data: data, encoding: .utf8) else { throw ValidationError("--auth-token-file: \(authTokenFile) is not UTF-8") }
            token = text.trimmingCharacters(in: .whitespacesAndNewlines)
        } else {
            token = nil
        }
        var running: [(name: String, process: Process, log: String)] = []
        /// Stops the children in reverse start order (the decision service drains its calls
        /// while the services it calls still answer), each given `stopTimeout` seconds before
        /// it is killed.
        func stopAll() {
            for child in running.reversed() where child.process.isRunning {
                child.process.interrupt()
                let end = ContinuousClock.now + .seconds(stopTimeout)
                while child.process.isRunning && ContinuousClock.now < end { Thread.sleep(forTimeInterval: 0.02) }
                if child.process.isRunning {
                    say("arbiter up: arbiter-\(child.name) did not stop within \(Int(stopTimeout)) s; killing it")
                    kill(child.process.processIdentifier, SIGKILL)
                }
                child.process.waitUntilExit()
            }
        }
        func fail(_ name: String, _ log: String, _ why: String) throws -> Never {
            stopAll()
            let tail = (try? String(contentsOfFile: log, encoding: .utf8))?.split(separator: "\n").suffix(20).joined(separator: "\n") ?? ""
            say("arbiter up: arbiter-\(name) \(why); the end of \(log):\n\(tail)")
            throw ExitCode(1)
        }

        for service in Self.services {
            var arguments = ["--host", host, "--port", "\(portBase + service.offset)", "--admin-port", "\(adminPortBase + service.offset)",
                             "--data-dir", dataDir + "/" + service.name, "--log-level", logLevel, "--parent-pid", "\(getpid())"]
            for peer in service.peers {
                let offset = Self.services.first { $0.name == peer }!.offset
                arguments += ["--\(peer)", "\(host == "0.0.0.0" ? "127.0.0.1" : host):\(portBase + offset)"]
            }
            if let config { arguments += ["--config", config] }
            if let authTokenFile { arguments += ["--auth-token-file", authTokenFile] }
            let log = dataDir + "/" + service.name + ".log"
            if !FileManager.default.fileExists(atPath: log) { _ = FileManager.default.createFile(atPath: log, contents: nil) }
            guard let handle = FileHandle(forWritingAtPath: log) else {
                stopAll()
                throw ValidationError("cannot write \(log)")
            }
            handle.seekToEndOfFile()
            let process = Process()
            process.executableURL = URL(fileURLWithPath: bin + "/arbiter-" + service.name)
            process.arguments = arguments
            process.standardOutput = handle
            process.standardError = handle
            do { try process.run() } catch { try fail(service.name, log, "did not start: \(error)") }
            running.append((service.name, process, log))
        }

        // Ready when each answers grpc.health.v1.Health/Check with SERVING.
        let end = ContinuousClock.now + .seconds(startTimeout)
        for (service, child) in zip(Self.services, running) {
            let client = RPCClient(host: host == "0.0.0.0" ? "127.0.0.1" : host, port: portBase + service.offset,
                                   configuration: .withToken(token))
            defer { client.close() }
            while true {
                if interrupted.isSet {
                    say("stopping (interrupted while starting)")
                    stopAll()
                    throw ExitCode(130)
                }
                guard child.process.isRunning else { try fail(service.name, child.log, "exited with status \(child.process.terminationStatus)") }
                if (try? await client.call(HealthV1.Health.check, HealthV1.HealthCheckRequest(), timeout: .seconds(1)))?.status == .serving { break }
                guard ContinuousClock.now < end else { try fail(service.name, child.log, "did not serve within \(Int(startTimeout)) s") }
                try await Task.sleep(for: .milliseconds(50))
            }
        }
        say("service    rpc (ttrpc)          admin (HTTP: /healthz /readyz /metrics)   log")
        for service in Self.services.sorted(by: { $0.offset < $1.offset }) {
            let rpc = "\(host):\(portBase + service.offset)", admin = "http://\(host):\(adminPortBase + service.offset)"
            say(service.name.padding(toLength: 11, withPad: " ", startingAt: 0) + rpc.padding(toLength: 21, withPad: " ", startingAt: 0)
                  + admin.padding(toLength: 42, withPad: " ", startingAt: 0) + dataDir + "/" + service.name + ".log")
        }
        say("all four serving; Ctrl-C stops them")

        // Until a signal, or until a service exits on its own.
        var exited: String?
        while !interrupted.isSet {
            if let child = running.first(where: { !$0.process.isRunning }) {
                exited = child.name
                break
            }
            try? await Task.sleep(for: .milliseconds(100))
        }
        if let name = exited, let child = running.first(where: { $0.name == name }) {
            try fail(name, child.log, "exited with status \(child.process.terminationStatus)")
        }
        say("stopping (each service drains its calls in flight)")
        stopAll()
        if let child = running.first(where: { $0.process.terminationReason != .exit || $0.process.terminationStatus != 0 }) {
            try fail(child.name, child.log, "did not stop cleanly (status \(child.process.terminationStatus))")
        }
        say("stopped")
    }
}

/// Set once SIGINT or SIGTERM arrives (`arbiter up`).
final class Interrupted: Sendable {
    private let flag = Atomic<Bool>(false)
    var isSet: Bool { flag.load(ordering: .relaxed) }
    func set() { flag.store(true, ordering: .relaxed) }
}

/// Writes a line to standard output at once (unbuffered, also when piped).
func say(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

/// A client for `host:port`, sending the token in `tokenFile` (if any) as authorization.
func makeClient(_ address: String, tokenFile: String?, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) throws -> RPCClient {
    let (host, port) = try hostAndPort(address)
    return RPCClient(host: host, port: port, configuration: .withToken(try readToken(tokenFile)), group: group)
}

/// `host:port` split; a clear error otherwise.
func hostAndPort(_ address: String) throws -> (host: String, port: Int) {
    guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else {
        throw ValidationError("address must be host:port, got \(address)")
    }
    return (String(address[..<colon]), port)
}

/// The token in `file` (surrounding whitespace dropped); nil without a file.
func readToken(_ file: String?) throws -> String? {
    try file.map { try String(contentsOfFile: $0, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) }
}
