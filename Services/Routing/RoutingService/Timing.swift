import Foundation

/// Quiet hours as minutes of the local day; `start == end` means none.
struct QuietHours: Sendable, Equatable {
    var startMinute: Int
    var endMinute: Int

    /// From "HH:MM" strings; nil when either is malformed.
    init?(start: String, end: String) {
        func minutes(_ text: String) -> Int? {
            let parts = text.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2, parts[0].count == 2, parts[1].count == 2,
                  let h = Int(parts[0]), let m = Int(parts[1]), (0..<24).contains(h), (0..<60).contains(m) else { return nil }
            return h * 60 + m
        }
        guard let s = minutes(start), let e = minutes(end) else { return nil }
        startMinute = s
        endMinute = e
    }

    func contains(minuteOfDay m: Int) -> Bool {
        if startMinute == endMinute { return false }
        return startMinute < endMinute ? (m >= startMinute && m < endMinute) : (m >= startMinute || m < endMinute)
    }
}

/// Wall-clock arithmetic in one time zone, DST included (Foundation's calendar does the
/// zone rules; nothing here assumes an hour is always 3,600 s of UTC).
struct LocalClock: Sendable {
    let zone: TimeZone
    let calendar: Calendar

    init(_ zone: TimeZone) {
        self.zone = zone
        var calendar = Calendar(identifier: .gregorian)
        calendar.timeZone = zone
        self.calendar = calendar
    }

    static func date(_ ms: Int64) -> Date { Date(timeIntervalSince1970: Double(ms) / 1000) }
    static func ms(_ date: Date) -> Int64 { Int64((date.timeIntervalSince1970 * 1000).rounded()) }

    /// Minutes since local midnight at `ms`.
    func minuteOfDay(_ ms: Int64) -> Int {
        let local = ms / 1000 + Int64(zone.secondsFromGMT(for: Self.date(ms)))
        return Int(((local / 60) % 1440 + 1440) % 1440)
    }

    func hour(_ ms: Int64) -> Int { minuteOfDay(ms) / 60 }

    /// The first instant at or after `ms` whose local time is `hour:minute` (the next
    /// existing time when a DST gap skips it).
    func next(hour: Int, minute: Int, atOrAfter ms: Int64) -> Int64 {
        if minuteOfDay(ms) == hour * 60 + minute && ms % 60_000 == 0 { return ms }
        let found = calendar.nextDate(after: Self.date(ms - 1), matching: DateComponents(hour: hour, minute: minute, second: 0),
                                      matchingPolicy: .nextTime)
        return found.map(Self.ms) ?? ms
    }

    /// `ms` itself, or when it falls in quiet hours, the moment they end.
    func leavingQuietHours(_ ms: Int64, _ quiet: QuietHours) -> Int64 {
        guard quiet.contains(minuteOfDay: minuteOfDay(ms)) else { return ms }
        return next(hour: quiet.endMinute / 60, minute: quiet.endMinute % 60, atOrAfter: ms)
    }

    /// The first instant at or after `ms` within local hour `hour`.
    func nextInstant(inHour hour: Int, atOrAfter ms: Int64) -> Int64 {
        self.hour(ms) == hour ? ms : next(hour: hour, minute: 0, atOrAfter: ms)
    }
}

/// When to send, or why not at all.
enum SendTime: Equatable {
    case at(Int64, reason: String)
    case suppressed(reason: String, detail: String)

    /// Critical messages go at the window's start. Normal ones avoid quiet hours and, within
    /// the window, go at the first of `bestHours` (ranked) that fits, else as soon as allowed.
    static func choose(start: Int64, end: Int64, critical: Bool, clock: LocalClock, quiet: QuietHours,
                       bestHours: [Int], bestHoursSource: String) -> SendTime {
        if critical { return .at(start, reason: "critical: as soon as allowed") }
        let earliest = clock.leavingQuietHours(start, quiet)
        guard earliest <= end else {
            return .suppressed(reason: "quiet_hours", detail: "the whole window falls in quiet hours (\(clock.zone.identifier))")
        }
        for hour in bestHours {
            let candidate = clock.leavingQuietHours(clock.nextInstant(inHour: hour, atOrAfter: start), quiet)
            if candidate <= end && clock.hour(candidate) == hour {
                return .at(candidate, reason: "\(bestHoursSource) best hour \(hour < 10 ? "0" : "")\(hour):00 (\(clock.zone.identifier))")
            }
        }
        return .at(earliest, reason: earliest == start ? "as soon as allowed" : "after quiet hours (\(clock.zone.identifier))")
    }
}
