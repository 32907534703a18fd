/// Bounds on answers that list things, so that a page always fits in a message (a larger
/// answer is RESOURCE_EXHAUSTED: see `RPCServer`).
public enum AnswerSize {
    /// Half the default largest message (4 MiB): room for the rest of the answer, and for a
    /// `--max-message-size` set somewhat lower.
    public static let listBudget = 2 << 20

    /// How many of the leading items, of these encoded sizes, fit in `maxBytes` together, each
    /// with its field's tag and length (counted as 6 bytes). With `atLeastOne`, the first item
    /// always counts, however large: a page that is never empty keeps a pager moving.
    public static func fitting(_ sizes: some Sequence<Int>, maxBytes: Int = listBudget, atLeastOne: Bool = true) -> Int {
        var bytes = 0, count = 0
        for size in sizes {
            bytes += size + 6
            guard bytes <= maxBytes || (atLeastOne && count == 0) else { break }
            count += 1
        }
        return count
    }
}
