/// A value a rule reads or compares: a string, a number or a bool.
public enum RuleValue: Sendable, Hashable, CustomStringConvertible {
    case string(String)
    case number(Double)
    case bool(Bool)

    public var description: String {
        switch self {
        case .string(let s): return "\"\(s)\""
        case .number(let n): return n == n.rounded() && abs(n) < 1e15 ? String(Int64(n)) : String(n)
        case .bool(let b): return String(b)
        }
    }
}

/// A rule that failed to parse or check, with the 1-based position of the problem, counted in
/// Unicode scalars (code points), as the length limit is.
public struct RuleError: Error, Sendable, Equatable, CustomStringConvertible {
    public var position: Int
    public var message: String
    public init(position: Int, _ message: String) {
        self.position = position
        self.message = message
    }
    public var description: String { "at position \(position): \(message)" }
}

/// A rule in Arbiter's small rule language, shared by profile segments, feature filters
/// and decision eligibility:
///
///     trait.tier == "gold" and feature.purchases_30d >= 2
///     not (consent.email == false) or context.placement in ["home", "cart"]
///
/// - Paths are `namespace.name` (the name may itself contain dots); which namespaces
///   exist is the caller's choice (`trait`, `feature`, `event`, `context`, ...).
/// - Literals: `"strings"` (with `\"` and `\\` escapes), numbers (`-2.5`), `true`, `false`.
/// - Operators, loosest first: `or`, `and`, `not`, then `==`, `!=`, `<`, `<=`, `>`, `>=`
///   and `in [literal, ...]`; parentheses group.
/// - A missing value makes every comparison false (`!=` included); values of different
///   types are never equal; `<` and friends compare two numbers or two strings.
///   A bare path or literal is true only when it is the bool `true`.
/// - Where the caller says what a path holds (`kinds`, such as `standardKind`), a rule that
///   could never be true that way is refused: `feature.n == "2"`, a bare `feature.n`,
///   `segment.gold > 1`.
public struct Rule: Sendable, CustomStringConvertible {
    /// What a value is, for the checks of `kinds`.
    public enum Kind: Sendable, Hashable {
        case string, number, bool

        init(_ value: RuleValue) {
            switch value {
            case .string: self = .string
            case .number: self = .number
            case .bool: self = .bool
            }
        }

        var described: String {
            switch self {
            case .string: return "a string"
            case .number: return "a number"
            case .bool: return "true or false"
            }
        }
    }

    /// What the services' namespaces hold: `feature.` numbers, `segment.` and `consent.`
    /// true or false, `context.` strings, `event.value` a number; traits and event
    /// properties any (nil).
    public static func standardKind(_ namespace: String, _ name: String) -> Kind? {
        switch namespace {
        case "feature": return .number
        case "segment", "consent": return .bool
        case "context": return .string
        case "event" where name == "value": return .number
        default: return nil
        }
    }

    /// The rule's text, as given.
    public let source: String
    let root: Node

    /// Every path the rule reads, in order of appearance.
    public let references: [(namespace: String, name: String)]

    indirect enum Node: Sendable {
        case literal(RuleValue)
        case path(String, String)
        case not(Node)
        case and(Node, Node)
        case or(Node, Node)
        case compare(Comparison, Node, Node)
        case member(Node, [RuleValue])
    }

    enum Comparison: String, Sendable { case eq = "==", ne = "!=", lt = "<", le = "<=", gt = ">", ge = ">=" }

    /// Parses `source`. `check` is asked about each path (namespace, name) and returns an
    /// error message to reject it (an unknown namespace, an undefined feature), or nil.
    /// `kinds` says what a path holds, where known: a comparison of it with a value of
    /// another kind, an order (`<`) on true or false, or a bare path that is not true or
    /// false is then an error at its position. Give it where rules are written; rules read
    /// back from a store are parsed without it (one written before these checks still loads).
    public init(_ source: String, check: (_ namespace: String, _ name: String) -> String? = { _, _ in nil },
                kinds: ((_ namespace: String, _ name: String) -> Kind?)? = nil) throws(RuleError) {
        let (root, references) = try withoutActuallyEscaping(check) { (check) throws(RuleError) in
            var parser = Parser(Array(source.unicodeScalars), check: check, kinds: kinds ?? { _, _ in nil }, checking: kinds != nil)
            return (try parser.parseRule(), parser.references)
        }
        self.source = source
        self.root = root
        self.references = references
    }

    public var description: String { source }

    /// Evaluates the rule; `lookup(namespace, name)` gives a path's value, nil when missing.
    public func evaluate(_ lookup: (_ namespace: String, _ name: String) -> RuleValue?) -> Bool {
        Self.truth(root, lookup)
    }

    /// Evaluates the rule when the paths of some namespaces cannot be known (their source is
    /// unreachable, not merely without a value): true or false when the rule's answer is the
    /// same whatever they hold (Kleene's three-valued logic), nil when it depends on them.
    /// `trait.age >= 18 or context.staff == "true"` is true for staff; `not segment.minors`
    /// is nil, where `evaluate` would read it as true.
    public func evaluate(_ lookup: (_ namespace: String, _ name: String) -> RuleValue?,
                         unknown: (_ namespace: String) -> Bool) -> Bool? {
        Self.truth(root, lookup, unknown)
    }

    static func truth(_ node: Node, _ lookup: (String, String) -> RuleValue?, _ unknown: (String) -> Bool) -> Bool? {
        switch node {
        case .not(let inner): return truth(inner, lookup, unknown).map { !$0 }
        case .and(let a, let b):
            let (x, y) = (truth(a, lookup, unknown), truth(b, lookup, unknown))
            if x == false || y == false { return false }
            return x == nil || y == nil ? nil : true
        case .or(let a, let b):
            let (x, y) = (truth(a, lookup, unknown), truth(b, lookup, unknown))
            if x == true || y == true { return true }
            return x == nil || y == nil ? nil : false
        case .compare(_, let a, let b):
            return isUnknown(a, lookup, unknown) || isUnknown(b, lookup, unknown) ? nil : truth(node, lookup)
        case .member(let a, _):
            return isUnknown(a, lookup, unknown) ? nil : truth(node, lookup)
        case .literal, .path:
            return isUnknown(node, lookup, unknown) ? nil : truth(node, lookup)
        }
    }

    /// Whether `node`'s value depends on an unknown namespace.
    static func isUnknown(_ node: Node, _ lookup: (String, String) -> RuleValue?, _ unknown: (String) -> Bool) -> Bool {
        switch node {
        case .literal: return false
        case .path(let namespace, _): return unknown(namespace)
        default: return truth(node, lookup, unknown) == nil
        }
    }

    static func truth(_ node: Node, _ lookup: (String, String) -> RuleValue?) -> Bool {
        switch node {
        case .not(let inner): return !truth(inner, lookup)
        case .and(let a, let b): return truth(a, lookup) && truth(b, lookup)
        case .or(let a, let b): return truth(a, lookup) || truth(b, lookup)
        case .compare(let op, let a, let b):
            guard let x = value(a, lookup), let y = value(b, lookup) else { return false }
            return compare(op, x, y)
        case .member(let a, let list):
            guard let x = value(a, lookup) else { return false }
            return list.contains { compare(.eq, x, $0) }
        case .literal, .path:
            return value(node, lookup) == .bool(true)
        }
    }

    static func value(_ node: Node, _ lookup: (String, String) -> RuleValue?) -> RuleValue? {
        switch node {
        case .literal(let v): return v
        case .path(let ns, let name): return lookup(ns, name)
        default: return .bool(truth(node, lookup))
        }
    }

    static func compare(_ op: Comparison, _ x: RuleValue, _ y: RuleValue) -> Bool {
        switch (op, x, y) {
        case (.eq, _, _): return x == y
        case (.ne, _, _): return x != y
        case (_, .number(let a), .number(let b)): return ordered(op, a, b)
        case (_, .string(let a), .string(let b)): return ordered(op, a, b)
        default: return false
        }
    }

    static func ordered<T: Comparable>(_ op: Comparison, _ a: T, _ b: T) -> Bool {
        switch op {
        case .lt: return a < b
        case .le: return a <= b
        case .gt: return a > b
        case .ge: return a >= b
        case .eq: return a == b
        case .ne: return a != b
        }
    }
}

/// A recursive-descent parser over unicode scalars; positions are 1-based scalar offsets.
struct Parser {
    let text: [Unicode.Scalar]
    let check: (String, String) -> String?
    let kinds: (String, String) -> Rule.Kind?
    /// `kinds` was given: the rule is being written, and the checks of what can never hold apply.
    let checking: Bool
    var index = 0
    var depth = 0
    var references: [(namespace: String, name: String)] = []

    init(_ text: [Unicode.Scalar], check: @escaping (String, String) -> String?, kinds: @escaping (String, String) -> Rule.Kind?,
         checking: Bool = false) {
        self.text = text
        self.check = check
        self.kinds = kinds
        self.checking = checking
    }

    /// A path whose kind `kinds` knows: its text and kind.
    func knownPath(_ node: Rule.Node) -> (text: String, kind: Rule.Kind)? {
        guard case .path(let namespace, let name) = node, let kind = kinds(namespace, name) else { return nil }
        return ("\(namespace).\(name)", kind)
    }

    /// What an operand is: a literal's kind, a known path's, true or false for a condition.
    func kind(of node: Rule.Node) -> Rule.Kind? {
        switch node {
        case .literal(let value): return Rule.Kind(value)
        case .path(let namespace, let name): return kinds(namespace, name)
        case .not, .and, .or, .compare, .member: return .bool
        }
    }

    /// A comparison that can never hold, at the position of its second operand (or its first,
    /// when only that one is a known path).
    func checkKinds(_ op: Rule.Comparison, _ left: Rule.Node, at leftStart: Int, _ right: Rule.Node, at rightStart: Int) throws(RuleError) {
        let leftPath = knownPath(left)
        guard let path = leftPath ?? knownPath(right) else { return }
        let pathIsLeft = leftPath != nil
        if path.kind == .bool, ![.eq, .ne].contains(op) {
            throw error("\(path.text) is true or false: it has no order (use == or !=)", at: pathIsLeft ? leftStart : rightStart)
        }
        guard let other = kind(of: pathIsLeft ? right : left), other != path.kind else { return }
        throw error("\(path.text) is \(path.kind.described) and never equals \(other.described)", at: pathIsLeft ? rightStart : leftStart)
    }

    static let maxLength = 4096
    static let maxDepth = 64

    mutating func parseRule() throws(RuleError) -> Rule.Node {
        guard text.count <= Self.maxLength else { throw RuleError(position: Self.maxLength + 1, "rule is longer than \(Self.maxLength) characters") }
        skipSpace()
        guard index < text.count else { throw RuleError(position: 1, "rule is empty") }
        skipSpace()
        let start = index
        let node = try parseOr()
        try checkCondition(node, at: start)
        skipSpace()
        guard index == text.count else { throw error("unexpected \(describeHere())") }
        return node
    }

    func error(_ message: String, at position: Int? = nil) -> RuleError {
        RuleError(position: (position ?? index) + 1, message)
    }

    func describeHere() -> String {
        guard index < text.count else { return "end of rule" }
        var word = ""
        var i = index
        while i < text.count, !text[i].properties.isWhitespace, word.count < 20 { word.unicodeScalars.append(text[i]); i += 1 }
        return "\"\(word)\""
    }

    mutating func skipSpace() {
        while index < text.count, text[index].properties.isWhitespace { index += 1 }
    }

    /// Consumes the keyword `word` when it stands alone here.
    mutating func keyword(_ word: String) -> Bool {
        skipSpace()
        let scalars = Array(word.unicodeScalars)
        guard index + scalars.count <= text.count, Array(text[index..<index + scalars.count]) == scalars else { return false }
        let end = index + scalars.count
        if end < text.count, Self.isNameScalar(text[end]) { return false }
        index = end
        return true
    }

    mutating func symbol(_ s: String) -> Bool {
        skipSpace()
        let scalars = Array(s.unicodeScalars)
        guard index + scalars.count <= text.count, Array(text[index..<index + scalars.count]) == scalars else { return false }
        index += scalars.count
        return true
    }

    static func isNameScalar(_ c: Unicode.Scalar) -> Bool {
        (c >= "a" && c <= "z") || (c >= "A" && c <= "Z") || (c >= "0" && c <= "9") || c == "_"
    }

    mutating func nested<T>(_ body: (inout Parser) throws(RuleError) -> T) throws(RuleError) -> T {
        depth += 1
        defer { depth -= 1 }
        guard depth <= Self.maxDepth else { throw error("rule nests deeper than \(Self.maxDepth) levels") }
        return try body(&self)
    }

    /// Parses `a or b or …`. Each operand of `or`, `and` and `not` is a condition, checked
    /// (`checkCondition`) once it is known to be one; a lone operand is left to the caller,
    /// which may compare it: `(feature.n) > 1`.
    mutating func parseOr() throws(RuleError) -> Rule.Node {
        try parseChain("or", Rule.Node.or) { (p: inout Parser) throws(RuleError) in try p.parseAnd() }
    }

    mutating func parseAnd() throws(RuleError) -> Rule.Node {
        try parseChain("and", Rule.Node.and) { (p: inout Parser) throws(RuleError) in try p.parseNot() }
    }

    /// `operand (word operand)*`, joined by `join`; with more than one operand, each is
    /// checked as a condition.
    mutating func parseChain(_ word: String, _ join: (Rule.Node, Rule.Node) -> Rule.Node,
                             _ operand: (inout Parser) throws(RuleError) -> Rule.Node) throws(RuleError) -> Rule.Node {
        skipSpace()
        let start = index
        var node = try operand(&self)
        while keyword(word) {
            try checkCondition(node, at: start)
            skipSpace()
            let next = index
            let right = try operand(&self)
            try checkCondition(right, at: next)
            node = join(node, right)
        }
        return node
    }

    mutating func parseNot() throws(RuleError) -> Rule.Node {
        if keyword("not") {
            skipSpace()
            let start = index
            let inner = try nested { (p: inout Parser) throws(RuleError) in try p.parseNot() }
            try checkCondition(inner, at: start)
            return .not(inner)
        }
        return try parseComparison()
    }

    /// A node read as true or false: a known path that holds something else never is.
    func checkCondition(_ node: Rule.Node, at start: Int) throws(RuleError) {
        // A literal that is not true or false never holds: `context.placement == "home" or "cart"`.
        if checking, case .literal(let value) = node, Rule.Kind(value) != .bool {
            throw error("\(value) is \(Rule.Kind(value).described), not true or false: compare a path with it (such as context.placement == \(value))", at: start)
        }
        guard let path = knownPath(node), path.kind != .bool else { return }
        throw error("\(path.text) is \(path.kind.described), not true or false: compare it (such as \(path.text) \(path.kind == .number ? "> 0" : "== \"x\""))", at: start)
    }

    mutating func parseComparison() throws(RuleError) -> Rule.Node {
        skipSpace()
        let leftStart = index
        let left = try parseOperand()
        skipSpace()
        for op in [Rule.Comparison.le, .ge, .eq, .ne, .lt, .gt] where symbol(op.rawValue) {
            skipSpace()
            let rightStart = index
            let right = try parseOperand()
            try checkKinds(op, left, at: leftStart, right, at: rightStart)
            return .compare(op, left, right)
        }
        if keyword("in") {
            guard symbol("[") else { throw error("expected \"[\" after in, found \(describeHere())") }
            var list: [RuleValue] = []
            if !symbol("]") {
                repeat {
                    skipSpace()
                    let start = index
                    guard case .literal(let v) = try parseOperand() else { throw error("a list holds literals only", at: start) }
                    if let path = knownPath(left), Rule.Kind(v) != path.kind {
                        throw error("\(path.text) is \(path.kind.described) and never equals \(Rule.Kind(v).described)", at: start)
                    }
                    list.append(v)
                } while symbol(",")
                guard symbol("]") else { throw error("expected \",\" or \"]\", found \(describeHere())") }
            }
            return .member(left, list)
        }
        return left
    }

    mutating func parseOperand() throws(RuleError) -> Rule.Node {
        skipSpace()
        guard index < text.count else { throw error("expected a value, found end of rule") }
        let c = text[index]
        if c == "(" {
            index += 1
            let inner = try nested { (p: inout Parser) throws(RuleError) in try p.parseOr() }
            guard symbol(")") else { throw error("expected \")\", found \(describeHere())") }
            return inner
        }
        if c == "\"" { return .literal(.string(try parseString())) }
        if c == "-" || c == "." || (c >= "0" && c <= "9") { return .literal(.number(try parseNumber())) }
        if Self.isNameScalar(c) {
            let start = index
            var words: [String] = []
            while true {
                var word = ""
                // After the namespace, a name may also hold `-` and `:`, as every name the
                // services accept may (`Names`): `feature.purchases-30d`, `consent.opt:in`.
                while index < text.count, Self.isNameScalar(text[index]) || (!words.isEmpty && (text[index] == "-" || text[index] == ":")) {
                    word.unicodeScalars.append(text[index])
                    index += 1
                }
                guard !word.isEmpty else { throw error("expected a name after \".\"") }
                words.append(word)
                guard index < text.count, text[index] == "." else { break }
                index += 1
            }
            if words.count == 1 {
                switch words[0] {
                case "true": return .literal(.bool(true))
                case "false": return .literal(.bool(false))
                case "and", "or", "not", "in": throw error("expected a value, found \"\(words[0])\"", at: start)
                default: throw error("\"\(words[0])\" is not a path: write namespace.name (such as trait.\(words[0]))", at: start)
                }
            }
            let namespace = words[0], name = words.dropFirst().joined(separator: ".")
            if let problem = check(namespace, name) { throw error(problem, at: start) }
            references.append((namespace, name))
            return .path(namespace, name)
        }
        throw error("unexpected \(describeHere())")
    }

    mutating func parseString() throws(RuleError) -> String {
        let start = index
        index += 1
        var value = ""
        while index < text.count {
            let c = text[index]
            index += 1
            if c == "\"" { return value }
            if c == "\\" {
                guard index < text.count, text[index] == "\"" || text[index] == "\\" else {
                    throw error("only \\\" and \\\\ escapes are allowed in strings", at: index - 1)
                }
                value.unicodeScalars.append(text[index])
                index += 1
            } else {
                value.unicodeScalars.append(c)
            }
        }
        throw error("unterminated string", at: start)
    }

    mutating func parseNumber() throws(RuleError) -> Double {
        let start = index
        var literal = ""
        if text[index] == "-" { literal = "-"; index += 1 }
        while index < text.count, (text[index] >= "0" && text[index] <= "9") || text[index] == "." {
            literal.unicodeScalars.append(text[index])
            index += 1
        }
        guard let number = Double(literal), number.isFinite else { throw error("\"\(literal)\" is not a number", at: start) }
        return number
    }
}
