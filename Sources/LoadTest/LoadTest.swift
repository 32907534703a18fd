import Foundation
import Histogram
import NIOCore
import RPC
import Synchronization

/// Drives calls against a server for a while and measures them: closed loop (`concurrency`
/// workers, each starting its next call when the last one answered) or open loop (a
/// constant arrival rate; each call has an intended start time and its latency counts from
/// then, so a stall is charged to every call it delayed: corrected for coordinated omission).
public enum LoadTest {
    /// Latencies in microseconds per kind of call (as returned by the call), and errors by status code.
    public struct Result: Sendable {
        public var histograms: [String: Histogram<UInt64>] = [:]
        public var errors: [String: Int] = [:]
        public var seconds: Double = 0
        /// Open loop: how late each call started after its intended start (µs): the generator's
        /// timers and threads on a busy machine, or every worker still in an earlier call. It is
        /// part of every latency above.
        public var lateness = Histogram<UInt64>(highestTrackableValue: Result.ceiling)
        /// With `timeline`: every call's start (µs after the run began; open loop: its intended
        /// start) and latency (µs), for figures over time (`timeline(every:)`).
        public var calls: [(startUs: UInt32, latencyUs: UInt32)] = []
        /// The share of the machine's CPU time its host gave to other guests during the run
        /// (steal, per cent; nil off Linux). Above a few per cent the latencies are not
        /// those of this machine alone.
        public var hostStealPercent: Double?
        /// The share of the machine's CPU time spent on its own work during the run (per
        /// cent; nil off Linux): the services and this generator together. Near 100, the
        /// machine was saturated.
        public var hostBusyPercent: Double?

        /// The histograms' range (µs): a longer time is counted as this rather than dropped.
        public static let ceiling: UInt64 = 60_000_000

        /// `nanoseconds` in µs, within the histograms' range (at least 1, at most `ceiling`).
        public static func micros(_ nanoseconds: Int64) -> UInt64 {
            UInt64(min(Int64(ceiling), max(1, nanoseconds / 1000)))
        }

        public var total: Histogram<UInt64> {
            histograms.values.reduce(into: Histogram<UInt64>(highestTrackableValue: Result.ceiling)) { $0.add($1) }
        }
        /// Calls per second, failed ones included.
        public var throughput: Double { Double(total.totalCount) / seconds }
        /// Calls per second that succeeded.
        public var succeeded: Double { Double(Int(total.totalCount) - errors.values.reduce(0, +)) / seconds }

        mutating func merge(_ other: Result) {
            for (kind, histogram) in other.histograms {
                histograms[kind, default: Histogram<UInt64>(highestTrackableValue: Result.ceiling)].add(histogram)
            }
            errors.merge(other.errors, uniquingKeysWith: +)
            lateness.add(other.lateness)
            calls += other.calls
        }

        /// One interval of the run: the calls that started in it (all kinds together).
        public struct Interval: Sendable, Equatable {
            /// Seconds after the run began.
            public var start: Double
            public var calls: Int
            public var p50Us: UInt32
            public var p99Us: UInt32
            public var maxUs: UInt32
        }

        /// The figures per `seconds` of the run, by when calls started (needs `timeline`):
        /// a stall shows as the intervals whose calls it delayed. Intervals without a call are
        /// listed with zeros. Percentiles are exact (nearest rank).
        public func timeline(every seconds: Double) -> [Interval] {
            let width = max(1, UInt64(seconds * 1_000_000))
            let span = (self.seconds * 1_000_000 / Double(width)).rounded(.up)
            var buckets: [[UInt32]] = Array(repeating: [], count: max(1, span.isFinite ? Int(span) : 1))
            for call in calls {
                let b = Int(UInt64(call.startUs) / width)
                if b >= buckets.count { buckets += Array(repeating: [], count: b - buckets.count + 1) }
                buckets[b].append(call.latencyUs)
            }
            return buckets.enumerated().map { b, latencies in
                let sorted = latencies.sorted()
                func rank(_ p: Double) -> UInt32 {
                    sorted.isEmpty ? 0 : sorted[max(0, Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1)]
                }
                return Interval(start: Double(UInt64(b) * width) / 1_000_000, calls: sorted.count,
                                p50Us: rank(50), p99Us: rank(99), maxUs: sorted.last ?? 0)
            }
        }

        /// Intervals (`timeline(every:)`) as CSV with a header line.
        public static func csv(_ intervals: [Interval]) -> String {
            "start_s,calls,p50_us,p99_us,max_us\n" + intervals.map {
                String(format: "%.3f,%d,%u,%u,%u\n", $0.start, $0.calls, $0.p50Us, $0.p99Us, $0.maxUs)
            }.joined()
        }

        /// The machine's busy and steal time in one line; nil when unknown.
        public var hostCPULine: String? {
            guard let hostStealPercent else { return nil }
            let busy = hostBusyPercent.map { String(format: "; busy (its own work, this generator's included): %.1f %%", $0) } ?? ""
            return String(format: "host steal time during the run: %.1f %% of the machine's CPU", hostStealPercent) + busy
        }

        /// Open loop: the lateness in one line; nil in a closed loop.
        public var latenessLine: String? {
            lateness.totalCount == 0 ? nil : "calls started late by p50 \(lateness.valueAtPercentile(50)) us, p99 \(lateness.valueAtPercentile(99)) us, "
                + "p99.9 \(lateness.valueAtPercentile(99.9)) us (part of the latencies)"
        }

        /// One line: throughput, percentiles and errors of `histogram`.
        public static func line(_ histogram: Histogram<UInt64>, seconds: Double) -> String {
            String(format: "%.0f calls/s, p50 %d us, p90 %d us, p99 %d us, p99.9 %d us, max %d us",
                   Double(histogram.totalCount) / seconds, histogram.valueAtPercentile(50), histogram.valueAtPercentile(90),
                   histogram.valueAtPercentile(99), histogram.valueAtPercentile(99.9), histogram.max)
        }

        /// A self-contained HTML page: latency by percentile for each kind of call (the
        /// x axis spreads the tail: 0 %, 90 %, 99 %, 99.9 %, 99.99 % are equally far apart, as in
        /// HdrHistogram's plotter), with the summary figures.
        public func html(title: String) -> String {
            let colors = ["#2b7a4b", "#3d6fb6", "#b85c5c", "#c9a227", "#7a4b9e"]
            let kinds = histograms.keys.sorted()
            let percentiles = stride(from: 0.0, through: 4.0, by: 0.05).map { 100 * (1 - pow(10, -$0)) }
            let top = Double(kinds.compactMap { histograms[$0]?.max }.max() ?? 1) / 1000
            let (width, height, left, bottom) = (720.0, 360.0, 60.0, 30.0)
            func x(_ p: Double) -> Double { left + (width - left) * min(4, -log10(max(1e-4, 1 - p / 100))) / 4 }
            func y(_ ms: Double) -> Double { (height - bottom) * (1 - ms / max(top, 1e-9)) }
            var svg = "<svg width=\"\(Int(width) + 20)\" height=\"\(Int(height))\" role=\"img\" font-size=\"12\">"
            for (label, p) in [("0 %", 0.0), ("90 %", 90.0), ("99 %", 99.0), ("99.9 %", 99.9), ("99.99 %", 99.99)] {
                svg += "<line x1=\"\(x(p))\" y1=\"0\" x2=\"\(x(p))\" y2=\"\(height - bottom)\" stroke=\"#ddd\"/>"
                svg += "<text x=\"\(x(p) - 12)\" y=\"\(height - 10)\">\(label)</text>"
            }
            for k in 0...4 {
                let ms = top * Double(k) / 4
                svg += "<text x=\"0\" y=\"\(y(ms) + 4)\">\(String(format: "%.1f ms", ms))</text>"
            }
            for (i, kind) in kinds.enumerated() {
                guard let h = histograms[kind], h.totalCount > 0 else { continue }
                let points = percentiles.map { p in String(format: "%.1f,%.1f", x(p), y(Double(h.valueAtPercentile(p)) / 1000)) }
                svg += "<polyline fill=\"none\" stroke-width=\"2\" stroke=\"\(colors[i % colors.count])\" points=\"\(points.joined(separator: " "))\"/>"
                svg += "<text x=\"\(left + 10)\" y=\"\(16 + 16 * i)\" fill=\"\(colors[i % colors.count])\">\(kind)</text>"
            }
            svg += "</svg>"
            let rows = kinds.map { "<tr><td>\($0)</td><td>\(Self.line(histograms[$0]!, seconds: seconds))</td></tr>" }.joined()
            let failed = errors.isEmpty ? "none" : errors.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
            return """
                <!doctype html><html><head><meta charset="utf-8"><title>\(title)</title>
                <style>body{font-family:system-ui,sans-serif;max-width:820px;margin:2em auto}td{padding:2px 8px}</style></head><body>
                <h1>\(title)</h1><p>Latency by percentile, from each call's intended start (open loop) or its start (closed loop).</p>
                \(svg)<table>\(rows)</table><p>errors: \(failed)</p></body></html>

                """
        }

        /// The calls of these kinds together (e.g. every Decide, degraded or not).
        public func merged(_ kinds: [String]) -> Histogram<UInt64> {
            kinds.compactMap { histograms[$0] }.reduce(into: Histogram<UInt64>(highestTrackableValue: Result.ceiling)) { $0.add($1) }
        }

        /// One histogram's figures as a JSON object (latencies in microseconds).
        public func figures(_ h: Histogram<UInt64>) -> [String: Any] {
            ["calls": h.totalCount, "per_second": Double(h.totalCount) / seconds, "p50_us": h.valueAtPercentile(50),
             "p90_us": h.valueAtPercentile(90), "p99_us": h.valueAtPercentile(99), "p99_9_us": h.valueAtPercentile(99.9), "max_us": h.max]
        }

        /// The figures as a JSON object (latencies in microseconds).
        public var json: [String: Any] {
            var object: [String: Any] = ["seconds": seconds, "total": figures(total), "errors": errors,
                                         "by_kind": histograms.mapValues { figures($0) }]
            if lateness.totalCount > 0 { object["start_lateness"] = figures(lateness) }
            if let hostStealPercent { object["host_steal_percent"] = hostStealPercent }
            if let hostBusyPercent { object["host_busy_percent"] = hostBusyPercent }
            return object
        }
    }

    /// Runs `call` for `seconds` with `concurrency` workers spread over `clients`; with `rate`
    /// (calls/s in total), open loop: every call intended before the end is counted, those
    /// still to start 10 s after it as DEADLINE_EXCEEDED without being made. `call` returns the kind of call it made (for per-kind figures).
    /// With `timeline`, every call's start and latency is kept too (8 bytes a call).
    public static func run(_ clients: [RPCClient], seconds: Double, concurrency: Int, rate: Double? = nil, timeline: Bool = false,
                           _ call: @escaping @Sendable (RPCClient, Int) async throws -> String) async throws -> Result {
        let cpuBefore = HostCPU.now()
        let begin = ContinuousClock.now
        let end = begin + .seconds(seconds)
        // Open loop: calls still to start this long after the end are not made (see below).
        let giveUpAt = end + .seconds(10)
        // One Result per client, shared by its workers (they run on the client's event loop,
        // so its lock is hardly ever contended). A Result per worker zeroed ~900 histograms of
        // 139 KB (125 MB) as the run began: a stall of the generator, which shares the machine
        // with the servers, in the first 100 ms of every run.
        let parts = clients.map { _ in Part() }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<concurrency {
                let client = clients[worker % clients.count]
                let part = parts[worker % clients.count]
                // Each worker runs on its client's event loop and waits with that loop's timers:
                // the generator's calls, answers and waits then need no thread hop. Before, in a
                // profile of the GetProfile bench, Dispatch's timer thread alone took 10 % of the
                // process and 46 % was in the kernel, CPU the measured server shares.
                group.addTask(executorPreference: EventLoopTaskExecutor(client.eventLoop)) {
                    var i = worker
                    let interval = rate.map { Duration.seconds(Double(concurrency) / $0) }
                    var intended = begin + (interval ?? .zero) * Double(worker) / Double(concurrency)
                    // Open loop: every call intended before the end is made and counted, however
                    // late (stopping at the clock's end would drop the calls a stall held back,
                    // the slowest ones); closed loop: until the end.
                    while interval != nil || ContinuousClock.now < end {
                        var lateness: UInt64?
                        if interval != nil {
                            guard intended < end else { break }  // no wait for a start past the end
                            if intended > .now { try await Self.wait(until: intended, on: client.eventLoop) }
                            lateness = Result.micros(intended.duration(to: .now).nanoseconds)
                        }
                        let start = interval == nil ? ContinuousClock.now : intended
                        intended = intended + (interval ?? .zero)
                        var kind = "error"
                        var failure: String?
                        if interval != nil, ContinuousClock.now > giveUpAt {
                            // A server that stopped answering: the calls still due are counted
                            // as past their deadline, not made one timeout after another.
                            failure = "\(RPCError.Code.deadlineExceeded)"
                        } else {
                            do {
                                kind = try await call(client, i)
                            } catch let error as RPCError {
                                failure = "\(error.code)"
                            } catch {
                                failure = "\(error)"
                            }
                        }
                        let latency = Result.micros(start.duration(to: .now).nanoseconds)
                        let offset = timeline ? max(0, begin.duration(to: start).nanoseconds / 1000) : nil
                        part.result.withLock { mine in
                            if let failure { mine.errors[failure, default: 0] += 1 }
                            if let lateness { mine.lateness.record(lateness) }
                            _ = mine.histograms[kind, default: Histogram<UInt64>(highestTrackableValue: Result.ceiling)].record(latency)
                            if let offset { mine.calls.append((UInt32(clamping: offset), UInt32(clamping: latency))) }
                        }
                        i += concurrency
                    }
                }
            }
            try await group.waitForAll()
        }
        var result = Result()
        for part in parts { result.merge(part.result.withLock { $0 }) }
        // The calls still in flight at the end (and, open loop, those a stall held back) ran
        // past it: they count against the time they took.
        result.seconds = max(seconds, Double(begin.duration(to: .now).nanoseconds) / 1e9)
        if let cpuBefore, let cpuAfter = HostCPU.now() {
            result.hostStealPercent = cpuBefore.stealPercent(until: cpuAfter)
            result.hostBusyPercent = cpuBefore.busyPercent(until: cpuAfter)
        }
        return result
    }

    /// The figures of one client's workers.
    final class Part: Sendable {
        let result = Mutex(Result())
    }

    /// Waits on `loop`'s timer until `instant` (a timer, not a sleep with tolerance: slack
    /// would add to the latencies). Cancelling the task cancels the timer.
    static func wait(until instant: ContinuousClock.Instant, on loop: any EventLoop) async throws {
        try Task.checkCancellation()
        let delay = ContinuousClock.now.duration(to: instant)
        guard delay > .zero else { return }
        let timer = loop.scheduleTask(in: .nanoseconds(delay.nanoseconds)) {}
        try await withTaskCancellationHandler {
            try await timer.futureResult.get()
        } onCancel: {
            timer.cancel()
        }
    }

    /// Calls `body` for every index in `0..<count`, `workers` at a time (worker `w` takes
    /// `w`, `w + workers`, ...); the first error stops the rest.
    public static func forEach(_ count: Int, workers: Int, _ body: @escaping @Sendable (Int) async throws -> Void) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<max(1, min(workers, count)) {
                group.addTask {
                    for i in stride(from: worker, to: count, by: max(1, min(workers, count))) { try await body(i) }
                }
            }
            try await group.waitForAll()
        }
    }
}
