import Rules
import Testing

@Suite struct RuleTests {
    let profile: [String: RuleValue] = [
        "trait.tier": .string("gold"), "feature.purchases_30d": .number(3), "trait.vip": .bool(true),
        "context.page.type": .string("cart"),
    ]

    func holds(_ rule: String) throws -> Bool {
        try Rule(rule).evaluate { profile["\($0).\($1)"] }
    }

    @Test func evaluatesTheIssueExample() throws {
        #expect(try holds(#"trait.tier == "gold" and feature.purchases_30d >= 2"#))
        #expect(try !holds(#"trait.tier == "gold" and feature.purchases_30d >= 4"#))
    }

    @Test(arguments: [
        (#"trait.tier != "silver""#, true),
        (#"not trait.tier == "gold""#, false),
        (#"feature.purchases_30d > 2 and feature.purchases_30d < 3.5"#, true),
        (#"feature.purchases_30d == 3"#, true),
        (#"trait.tier in ["silver", "gold"]"#, true),
        (#"trait.tier in []"#, false),
        (#"trait.vip"#, true),
        (#"trait.tier"#, false),
        (#"trait.missing == "x" or trait.missing != "x""#, false),
        (#"not trait.missing == "x""#, true),
        (#"trait.tier == 3"#, false),
        (#"trait.tier != 3"#, true),
        (#"trait.tier < "h""#, true),
        (#"trait.tier < 5"#, false),
        (#"context.page.type == "cart""#, true),
        (#"(trait.vip or false) and (feature.purchases_30d >= -1)"#, true),
        (#"true and not false"#, true),
        (#"trait.tier == "go\"ld""#, false),
    ])
    func semantics(rule: String, expected: Bool) throws {
        #expect(try holds(rule) == expected, "\(rule)")
    }

    @Test(arguments: [
        ("", 1, "rule is empty"),
        (#"trait.tier == "#, 15, "expected a value, found end of rule"),
        (#"trait.tier = "gold""#, 12, #"unexpected "=""#),
        (#"tier == "gold""#, 1, "is not a path"),
        (#"trait.tier == "gold"#, 15, "unterminated string"),
        (#"(trait.vip"#, 11, #"expected ")""#),
        (#"trait.tier in "gold""#, 15, #"expected "[""#),
        (#"trait.tier in [trait.x]"#, 16, "a list holds literals only"),
        (#"feature.purchases_30d >= 1.2.3"#, 26, "is not a number"),
        (#"trait.vip and and"#, 15, "expected a value"),
        (#"trait. == 1"#, 7, "expected a name"),
    ])
    func errorsNameThePosition(rule: String, position: Int, message: String) {
        do {
            _ = try Rule(rule)
            Issue.record("\(rule) parsed")
        } catch {
            #expect(error.position == position, "\(rule): \(error)")
            #expect(error.message.contains(message), "\(rule): \(error)")
        }
    }

    /// Rules that could never be true the way they are written, refused where the kinds are
    /// known (as the services define rules); read back without kinds, they still parse.
    @Test(arguments: [
        (#"trait.tier == "gold" and feature.purchases_30d >= "2""#, 51, #"feature.purchases_30d is a number and never equals a string"#),
        ("feature.purchases_30d == true", 26, "is a number and never equals true or false"),
        ("feature.purchases_30d", 1, "feature.purchases_30d is a number, not true or false: compare it (such as feature.purchases_30d > 0)"),
        ("not feature.n", 5, "not true or false"),
        ("segment.gold > 1", 1, "segment.gold is true or false: it has no order"),
        (#"segment.gold == "yes""#, 17, "never equals a string"),
        (#"context.age >= 18"#, 16, "context.age is a string and never equals a number"),
        (#"18 <= context.age"#, 1, "context.age is a string and never equals a number"),
        (#"feature.n in [1, "2"]"#, 18, "never equals a string"),
        ("consent.marketing.email == 1", 28, "is true or false and never equals a number"),
        (#"event.value == "x""#, 16, "event.value is a number"),
        ("(feature.n)", 1, "not true or false"),
        ("segment.a and (feature.n)", 15, "not true or false"),
        ("(feature.n) or segment.a", 1, "not true or false"),
        ("not (feature.n)", 5, "not true or false"),
        // A literal that is not true or false never holds (before: accepted, and always false).
        (#"context.placement == "home" or "cart""#, 32, #""cart" is a string, not true or false: compare a path with it"#),
        ("segment.a and 1", 15, "1 is a number, not true or false"),
        (#""home""#, 1, "is a string, not true or false"),
        ("not 0", 5, "0 is a number, not true or false"),
    ])
    func kindsRefuseRulesThatCannotHold(rule: String, position: Int, message: String) throws {
        do {
            _ = try Rule(rule, kinds: Rule.standardKind)
            Issue.record("\(rule) parsed")
        } catch {
            #expect(error.position == position, "\(rule): \(error)")
            #expect(error.message.contains(message), "\(rule): \(error)")
        }
        _ = try Rule(rule)  // a stored rule from before the checks still loads
    }

    @Test(arguments: [
        #"feature.n >= 2 and segment.gold and not consent.marketing.email and context.page == "home""#,
        #"trait.age >= 18 and trait.tier == "gold" and trait.vip"#,  // traits may hold anything
        "segment.gold == false or (feature.n > 1) == true",
        #"event.sku == "A" and event.value > 3 and feature.n in [1, 2]"#,
        // A parenthesised operand is still an operand.
        #"(feature.n) > 1 and feature.a > (feature.b) and (context.page) == "home" and (feature.n) in [1, 2]"#,
        "((feature.n)) >= 2",
        "true or segment.a",  // a bool literal is a condition
    ])
    func kindsAcceptRulesThatCanHold(rule: String) throws {
        _ = try Rule(rule, kinds: Rule.standardKind)
    }

    /// With `trait.` and `segment.` unknown (their source unreachable), only `context.` known.
    @Test(arguments: [
        ("not segment.minors", nil),
        (#"trait.tier == "gold" or context.page.type == "cart""#, true),
        (#"trait.tier == "gold" and context.page.type == "cart""#, nil),
        (#"trait.tier == "gold" and context.page.type == "home""#, false),
        (#"not (trait.tier == "gold" or context.page.type == "cart")"#, false),
        (#"context.page.type in ["cart", "home"]"#, true),
        ("trait.age in [1, 2]", nil),
        (#"(segment.vip == true) == false or context.page.type == "home""#, nil),
        ("true or segment.vip", true),
        ("false and segment.vip", false),
    ] as [(String, Bool?)])
    func unknownNamespacesGiveKleeneAnswers(rule: String, expected: Bool?) throws {
        let answer = try Rule(rule).evaluate({ profile["\($0).\($1)"] }, unknown: { $0 != "context" })
        #expect(answer == expected)
        // Where the answer does not depend on the unknown paths, it is the two-valued one.
        if let answer { #expect(try Rule(rule).evaluate { profile["\($0).\($1)"] } == answer) }
    }

    @Test func checkRejectsPathsWithTheirPosition() {
        do {
            _ = try Rule(#"trait.tier == "gold" and feature.nope > 1"#) { ns, name in
                ns == "feature" && name == "nope" ? "feature \"nope\" is not defined" : nil
            }
            Issue.record("parsed")
        } catch {
            #expect(error == RuleError(position: 26, "feature \"nope\" is not defined"))
        }
    }

    @Test func referencesAreListed() throws {
        let rule = try Rule(#"trait.tier == "gold" or feature.n > 1"#)
        #expect(rule.references.map { "\($0.namespace).\($0.name)" } == ["trait.tier", "feature.n"])
    }

    @Test("every name the services accept can be referenced: `-` and `:` after the namespace")
    func namesWithDashesAndColons() throws {
        let values: [String: RuleValue] = ["feature.purchases-30d": .number(3), "trait.first-name": .string("Ada"), "consent.opt:in.email": .bool(true)]
        let rule = try Rule(#"feature.purchases-30d >= 2 and trait.first-name == "Ada" and consent.opt:in.email"#)
        #expect(rule.evaluate { values["\($0).\($1)"] })
        #expect(rule.references.map(\.name) == ["purchases-30d", "first-name", "opt:in.email"])
        // A negative number after a name still reads as one, and a namespace stays letters, digits and _.
        #expect(try Rule("feature.purchases-30d >= -1").evaluate { values["\($0).\($1)"] })
        #expect(throws: RuleError.self) { try Rule("trait-x.a == 1") }
    }

    @Test func deepNestingIsAnErrorNotACrash() {
        let rule = String(repeating: "(", count: 10_000) + "true" + String(repeating: ")", count: 10_000)
        #expect(throws: RuleError.self) { try Rule(rule) }
        let nots = String(repeating: "not ", count: 1000) + "true"
        #expect(throws: RuleError.self) { try Rule(nots) }
    }
}
