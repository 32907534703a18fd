import Foundation

/// The whole machine's CPU time so far, from the first line of Linux's `/proc/stat` (ticks
/// summed over every CPU): what a load test needs to tell a slow service from a virtual
/// machine whose host ran other guests meanwhile (steal time), and from a machine with no
/// CPU left (busy time: the load generator shares the machine with what it measures).
public struct HostCPU: Sendable, Equatable {
    /// user, nice, system, idle, iowait, irq, softirq and steal together.
    public var total: UInt64
    /// Time this machine had work but its host ran something else.
    public var steal: UInt64
    /// Time with nothing to run: idle and iowait.
    public var idle: UInt64

    /// Reads `/proc/stat`; nil where there is none (not Linux) or it does not parse.
    public static func now() -> HostCPU? {
        guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8) else { return nil }
        return HostCPU(procStat: text)
    }

    /// Parses the `cpu` line of `/proc/stat`'s text; nil if it has fewer than 8 numbers
    /// (kernels before 2.6.11 had no steal column).
    public init?(procStat text: String) {
        guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("cpu ") }) else { return nil }
        let fields = line.split(separator: " ").dropFirst().prefix(8).compactMap { UInt64($0) }
        guard fields.count == 8 else { return nil }
        total = fields.reduce(0, +)
        steal = fields[7]
        idle = fields[3] + fields[4]
    }

    public init(total: UInt64, steal: UInt64, idle: UInt64) {
        self.total = total
        self.steal = steal
        self.idle = idle
    }

    /// The share of the machine's time from `self` to `later` that its host gave elsewhere,
    /// in per cent; nil when no time passed or the counters went backwards.
    public func stealPercent(until later: HostCPU) -> Double? {
        guard later.total > total, later.steal >= steal else { return nil }
        return 100 * Double(later.steal - steal) / Double(later.total - total)
    }

    /// The share of the machine's time from `self` to `later` spent running its own work
    /// (user, nice, system, irq, softirq: neither idle, iowait nor stolen), in per cent; nil
    /// when no time passed or the counters went backwards. Near 100, the machine had no CPU
    /// to spare: latencies then measure the queue for a core.
    public func busyPercent(until later: HostCPU) -> Double? {
        guard later.total > total, later.steal >= steal, later.idle >= idle else { return nil }
        let elapsed = later.total - total, notBusy = (later.steal - steal) + (later.idle - idle)
        guard notBusy <= elapsed else { return nil }
        return 100 * Double(elapsed - notBusy) / Double(elapsed)
    }
}
