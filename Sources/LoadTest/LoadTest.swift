import Foundation
import Histogram
import RPC

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

        public var total: Histogram<UInt64> {
            histograms.values.reduce(into: Histogram<UInt64>(highestTrackableValue: 60_000_000)) { $0.add($1) }
        }
        /// Calls per second, failed ones included.
        public var throughput: Double { Double(total.totalCount) / seconds }

        mutating func merge(_ other: Result) {
            for (kind, histogram) in other.histograms {
                histograms[kind, default: Histogram<UInt64>(highestTrackableValue: 60_000_000)].add(histogram)
            }
            errors.merge(other.errors, uniquingKeysWith: +)
        }

        /// One line: throughput, percentiles and errors of `histogram`.
        public static func line(_ histogram: Histogram<UInt64>, seconds: Double) -> String {
            String(format: "%.0f calls/s, p50 %d us, p90 %d us, p99 %d us, p99.9 %d us, max %d us",
                   Double(histogram.totalCount) / seconds, histogram.valueAtPercentile(50), histogram.valueAtPercentile(90),
                   histogram.valueAtPercentile(99), histogram.valueAtPercentile(99.9), histogram.max)
        }

        /// The figures as a JSON object (latencies in microseconds).
        public var json: [String: Any] {
            func figures(_ h: Histogram<UInt64>) -> [String: Any] {
                ["calls": h.totalCount, "per_second": Double(h.totalCount) / seconds, "p50_us": h.valueAtPercentile(50),
                 "p90_us": h.valueAtPercentile(90), "p99_us": h.valueAtPercentile(99), "p99_9_us": h.valueAtPercentile(99.9), "max_us": h.max]
            }
            return ["seconds": seconds, "total": figures(total), "errors": errors,
                    "by_kind": histograms.mapValues { figures($0) }]
        }
    }

    /// Runs `call` for `seconds` with `concurrency` workers spread over `clients`; with `rate`
    /// (calls/s in total), open loop. `call` returns the kind of call it made (for per-kind figures).
    public static func run(_ clients: [RPCClient], seconds: Double, concurrency: Int, rate: Double? = nil,
                           _ call: @escaping @Sendable (RPCClient, Int) async throws -> String) async throws -> Result {
        let begin = ContinuousClock.now
        let end = begin + .seconds(seconds)
        var result = try await withThrowingTaskGroup(of: Result.self) { group in
            for worker in 0..<concurrency {
                group.addTask {
                    var mine = Result()
                    var i = worker
                    let client = clients[worker % clients.count]
                    let interval = rate.map { Duration.seconds(Double(concurrency) / $0) }
                    var intended = begin + (interval ?? .zero) * Double(worker) / Double(concurrency)
                    while ContinuousClock.now < end {
                        if interval != nil {
                            if intended > .now { try await Task.sleep(until: intended) }
                            guard intended < end else { break }
                        }
                        let start = interval == nil ? ContinuousClock.now : intended
                        intended = intended + (interval ?? .zero)
                        var kind = "error"
                        do {
                            kind = try await call(client, i)
                        } catch let error as RPCError {
                            mine.errors["\(error.code)", default: 0] += 1
                        } catch {
                            mine.errors["\(error)", default: 0] += 1
                        }
                        _ = mine.histograms[kind, default: Histogram<UInt64>(highestTrackableValue: 60_000_000)]
                            .record(UInt64(max(1, start.duration(to: .now).nanoseconds / 1000)))
                        i += concurrency
                    }
                    return mine
                }
            }
            var total = Result()
            for try await part in group { total.merge(part) }
            return total
        }
        result.seconds = seconds
        return result
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
