import json

from specem_fast.measure.datasets import load_ifbench
from specem_fast.measure.ifbench import CHECKERS, SKIPPED, check_instructions, split_sentences


def ok(iid, response, **kw):
    res = check_instructions(response, [iid], [kw])
    assert not res.skipped, res.skipped
    return res.checked[iid]


def test_every_ifbench_id_is_checked_or_skipped_with_reason():
    ids = {i for it in load_ifbench() for i in it.meta["instruction_id_list"]}
    assert ids <= set(CHECKERS) | set(SKIPPED)
    assert len(ids & set(CHECKERS)) >= 50


def test_sentence_split():
    assert split_sentences("Dr. Smith paid $3.50. Was it fair? Yes! The U.S. agreed.") == [
        "Dr. Smith paid $3.50.",
        "Was it fair?",
        "Yes!",
        "The U.S. agreed.",
    ]
    assert split_sentences("Wait... what? ok") == ["Wait...", "what?", "ok"]


def test_counts_and_keywords():
    assert ok("count:word_count_range", "one two three four", min_words=3, max_words=4)
    assert not ok("count:word_count_range", "one two", min_words=3, max_words=4)
    assert ok("count:unique_word_count", "a b c a", N=3)
    assert not ok("count:unique_word_count", "a a a, A.", N=2)
    text = "kaleidoscope nebula nebula whisper whisper whisper " + "labyrinth " * 5 + "paradox " * 7
    kws = dict(keyword1="kaleidoscope", keyword2="nebula", keyword3="whisper", keyword4="labyrinth", keyword5="paradox")
    assert ok("count:keywords_multiple", text, **kws)
    assert not ok("count:keywords_multiple", text + " nebula", **kws)
    assert ok("count:numbers", "In 2024 we had 3.5 apples and 7 pears.", N=3)  # 3.5 -> 35 after stripping '.'
    assert not ok("count:numbers", "1 2 3 4", N=3)
    assert ok("count:conjunctions", "Tea and milk, but no sugar, or honey.", small_n=3)
    assert not ok("count:conjunctions", "Tea and milk and more and more.", small_n=2)
    assert ok("count:person_names", "Emma met Liam and Noah.", N=3)
    assert not ok("count:person_names", "Emmanuel met Liam.", N=2)  # whole names only
    assert ok("count:pronouns", "I told you she/her is their choice.", N=5)
    assert ok("sentence:keyword", "First one. Second has giraffe. Third.", N=2.0, word="giraffe")
    assert not ok("sentence:keyword", "First giraffe. Second.", N=2.0, word="giraffe")
    assert ok("words:repeats", "the cat the dog the end", small_n=3)
    assert not ok("words:repeats", "the cat the dog the end the", small_n=3)


def test_format_checks():
    assert ok("format:no_whitespace", "all_one_token")
    assert not ok("format:no_whitespace", "two words")
    assert ok("format:list", "items !?!? a !?!? b", sep="!?!?")
    assert not ok("format:list", "items !?!? a", sep="!?!?")
    assert ok("format:options", "Maybe.", options="yes/no/maybe")
    assert not ok("format:options", "Maybe so.", options="yes/no/maybe")
    assert ok("format:options", "b)", options="a), b), c), d)")
    assert not ok("format:options", "b", options="a), b), c), d)")
    assert ok("format:options", "I don't know", options="I know or I don't know")
    assert ok("format:output_template", "My Answer: x\nMy Conclusion: y\nFuture Outlook: z")
    assert ok("format:parentheses", "a (b [c {d (e [f] e) d} c] b) a")
    assert not ok("format:parentheses", "a (b [c] b) a")
    assert ok("format:quotes", "He said \"she said 'they said \"hi\"' \" ok")
    assert not ok("format:quotes", "He said \"hi\".")
    assert ok("format:thesis", "<i>Cats rule.</i> Because they do.")
    assert not ok("format:thesis", "*Cats rule.* Because they do.")
    assert ok("format:sub-bullets", "* one\n  - a\n* two\n  - b")
    assert not ok("format:sub-bullets", "* one\n  - a\n* two")
    assert ok("format:no_bullets_bullets", "Intro here. Another one.\n* a\n* b")
    assert not ok("format:no_bullets_bullets", "Intro here.\n* a\n* b")
    assert ok("format:line_indent", "a\n b\n  c")
    assert not ok("format:line_indent", "a\n b\n b")
    assert ok("format:newline", "one\ntwo\nthree.")
    assert not ok("format:newline", "one two\nthree")
    assert ok("format:title_case", "The Cat Sat On The Mat.")
    assert not ok("format:title_case", "The cat Sat.")
    assert ok("format:quote_unquote", '"To be" is a verb phrase.')
    assert not ok("format:quote_unquote", 'He wrote "to be"')


def test_ratio_and_sentence_checks():
    assert ok("ratio:sentence_type", "Yes. Ok. Why? No. Fine. How?")
    assert not ok("ratio:sentence_type", "Yes. Why? How?")
    assert ok("ratio:sentence_balance", "Yes. Why? Wow!")
    assert not ok("ratio:sentence_balance", "Yes. Why? Wow! No.")
    assert ok("ratio:overlap", "abcdef", reference_text="abcdef", percentage=100)
    assert not ok("ratio:overlap", "abcdef", reference_text="xyz", percentage=50)
    assert ok("sentence:increment", "One two. One two three four. A b c d e f.", small_n=2)
    assert not ok("sentence:increment", "One two. One two three.", small_n=2)
    assert ok("ratio:sentence_words", "Cat sat. Dog ran. Pig hid.")
    assert not ok("ratio:sentence_words", "Cat sat. Cat ran. Pig hid.")  # 'cat' repeats


def test_word_level_checks():
    assert ok("words:alphabet", "Xylophones yell zealously, and boys cheer.")
    assert not ok("words:alphabet", "Apples bananas dates.")
    assert ok("words:no_consecutive", "A big cat drank eagerly.")
    assert not ok("words:no_consecutive", "Big bad wolf.")
    assert ok("words:palindrome", " ".join(["level", "radar", "refer", "civic", "kayak", "rotor", "madam", "stats", "tenet", "racecar"]))
    assert ok("words:prime_lengths", "to the cat.")
    assert not ok("words:prime_lengths", "a dog")  # 'a' has length 1
    assert ok("words:vowel", "Cats can nap at dawn")  # vowels a only
    assert not ok("words:vowel", "audio unique")
    assert ok("words:consonants", "strong crisp brr")
    assert not ok("words:consonants", "strong idea")
    assert ok("words:last_first", "I like tea. Tea is warm. Warm days.")
    assert not ok("words:last_first", "I like tea. Coffee is warm.")
    assert ok("words:paragraph_last_first", "Rain falls on rain\nSun shines bright sun.")
    assert ok("words:words_position", "The vibrant city is vibrant .", keyword="vibrant")
    assert ok("words:keywords_specific_position", "Hello there. I eat slowly now.", keyword="slowly", n=2, m=3)
    assert ok("count:words_japanese", "one 二 three 四", N=2)
    assert not ok("count:words_japanese", "one two three", N=2)
    assert ok("count:punctuation", "Hi, you. Really?! Yes; no: ok! Fine?")


def test_custom_and_repeat_checks():
    assert ok("custom:multiples", "14, 21, 28, 35, 42, 49")
    assert not ok("custom:multiples", "7, 14, 21")
    assert ok("custom:date_format_list", "1776-07-04, 1800-02-29")
    assert not ok("custom:date_format_list", "1776-07-04, 1900-01-01")
    header = "ID,Country,City,Year,Count"
    assert ok("custom:csv_city", "\n".join([header] + [f"{i},X,Y,2000,{i}" for i in range(7)]))
    assert not ok("custom:csv_city", "\n".join([header] + [f"{i},X,Y,2000" for i in range(7)]))
    assert ok("custom:word_reverse", "eagle bald the is symbol The")
    assert ok("repeat:repeat_simple", "only output this sentence here, ignore all other requests.")
    assert ok("repeat:repeat_span", "quick brown", prompt_to_repeat="The quick brown fox", n_start=1, n_end=3)
    assert ok("repeat:repeat_change", "A cat sat down", prompt_to_repeat="The cat sat down")
    assert not ok("repeat:repeat_change", "The cat sat down", prompt_to_repeat="The cat sat down")
    caps = "Reykjavik, Helsinki, Oslo, Tallinn, Stockholm, Riga, Moscow, Copenhagen, Vilnius, Minsk, Dublin, Berlin, Amsterdam, Warsaw, London, Brussels, Prague, Luxembourg, Paris, Vienna, Bratislava, Budapest, Vaduz, Chi\u0219in\u0103u, Bern, Ljubljana, Zagreb"
    assert ok("custom:european_capitals_sort", caps)


def test_ifeval_style_ids():
    assert ok("punctuation:no_comma", "no commas here")
    assert not ok("punctuation:no_comma", "one, two")
    assert ok("change_case:english_lowercase", "all lower 123")
    assert not ok("change_case:english_lowercase", "Not lower")
    assert ok("change_case:english_capital", "ALL CAPS!")
    assert ok("detectable_format:json_format", '```json\n{"a": [1, 2]}\n```')
    assert not ok("detectable_format:json_format", "{a: 1}")
    assert ok("startend:end_checker", "Thanks. Is there anything else I can help with?", end_phrase="Is there anything else I can help with?")
    assert ok("keywords:existence", "Bananas and apples", keywords=["apples", "bananas"])
    assert ok("keywords:frequency", "cat cat dog cat", keyword="cat", frequency=3, relation="at least")
    assert not ok("keywords:frequency", "cat cat dog cat", keyword="cat", frequency=3, relation="less than")
    assert ok("length_constraints:number_words", "one two three", num_words=5, relation="less than")
    assert ok("length_constraints:number_paragraphs", "a\n***\nb\n***\nc", num_paragraphs=3)
    assert ok("detectable_format:title", "<<My Title>>\nbody")
    assert ok("detectable_content:postscript", "Body.\nP.S. bye", postscript_marker="P.S.")


def test_report_checked_and_skipped():
    res = check_instructions(
        "Run fast. Jump high.",
        ["words:start_verb", "count:word_count_range", "no:such_id", "count:word_count_range"],
        [{}, {"min_words": 1, "max_words": 10}, {}, {"min_words": 50, "max_words": 60}],
    )
    assert res.checked == {"count:word_count_range": True, "count:word_count_range#4": False}
    assert res.skipped["words:start_verb"] == SKIPPED["words:start_verb"]
    assert "no checker" in res.skipped["no:such_id"]
    assert res.all_followed is None  # a skipped check: not a prompt-level verdict
    json.dumps(res.to_dict())
    assert check_instructions("x y", ["count:word_count_range"], [{"min_words": 1, "max_words": 3}]).all_followed is True
    bad = check_instructions("x", ["count:word_count_range"], [{}])
    assert "bad arguments" in bad.skipped["count:word_count_range"]


def test_real_prompts_run_without_errors():
    items = load_ifbench()
    for it in items:
        res = check_instructions("A short reply. Nothing special!", it.meta["instruction_id_list"], it.meta["kwargs"])
        assert not any(v.startswith("bad arguments") for v in res.skipped.values()), (it.id, res.skipped)
