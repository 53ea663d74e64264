"""The community harness's JGLUE rules: prompts byte for byte, seeded examples, EM.

The expected strings below were produced by Stability-AI/lm-evaluation-harness, branch
jp-stable (lm_eval/tasks/ja/jcommonsenseqa.py: JCommonsenseQAWithFintanPrompt = 1.1-0.2,
JCommonsenseQAWithJAAlpacaPrompt = 1.1-0.3; lm_eval/tasks/ja/jsquad.py: JSQuADWithFintanPrompt
= 1.1-0.2, JSQuADWithJAAlpacaPrompt = 1.1-0.3), driven as lm_eval/evaluator.py drives them:
`rnd = random.Random(); rnd.seed(42); rnd.shuffle(docs)`, then `task.fewshot_context(doc,
k, rnd=rnd, description="")` per doc, with the train docs given. The items are official
JGLUE v1.1 items (tests/unit/data/jglue: the first JCommonsenseQA valid and train lines; the
first JSQuAD valid questions, and six later valid questions standing in as the train split).
The first prompt of each run is pasted whole; every prompt is pinned by its SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from jobs.evaluate.files import load_jcommonsenseqa, load_jsquad
from jobs.evaluate.harness import exact_match, first_line, normalize_answer, plan, template

DATA = Path(__file__).parent / "data" / "jglue"

JCQA_02_FIRST = (
    "質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。なお、回答は選択肢の番号(例:0)でするものとします。 \n"
    "\n"
    "質問:火を起こすとあらわれるもくもくするものは？\n"
    "選択肢:0.歯の変色,1.ガス,2.中毒,3.爆発,4.煙\n"
    "回答:4\n"
    "\n"
    "質問:未成年者を監護・教育し，彼らを監督し，彼らの財産上の利益を守る法律上の義務をもつ人は？\n"
    "選択肢:0.浮浪者,1.保護者,2.お坊さん,3.宗教者,4.預言者\n"
    "回答:1\n"
    "\n"
    "質問:中東にある国は？\n"
    "選択肢:0.アメリカ,1.拘置所,2.ロシア,3.アフガニスタン,4.空港\n"
    "回答:3\n"
    "\n"
    "質問:水を出すときに捻るものは？\n"
    "選択肢:0.蛇口,1.ハンドル,2.流し,3.釘,4.食器棚\n"
    "回答:"
)
JCQA_03_FIRST = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n"
    "\n"
    "### 指示:\n"
    "与えられた選択肢の中から、最適な答えを選んでください。出力は以下から選択してください：\n"
    "- 歯の変色\n"
    "- ガス\n"
    "- 中毒\n"
    "- 爆発\n"
    "- 煙\n"
    "\n"
    "### 入力:\n"
    "火を起こすとあらわれるもくもくするものは？\n"
    "\n"
    "### 応答:\n"
    "煙\n"
    "\n"
    "### 指示:\n"
    "与えられた選択肢の中から、最適な答えを選んでください。出力は以下から選択してください：\n"
    "- 浮浪者\n"
    "- 保護者\n"
    "- お坊さん\n"
    "- 宗教者\n"
    "- 預言者\n"
    "\n"
    "### 入力:\n"
    "未成年者を監護・教育し，彼らを監督し，彼らの財産上の利益を守る法律上の義務をもつ人は？\n"
    "\n"
    "### 応答:\n"
    "保護者\n"
    "\n"
    "### 指示:\n"
    "与えられた選択肢の中から、最適な答えを選んでください。出力は以下から選択してください：\n"
    "- アメリカ\n"
    "- 拘置所\n"
    "- ロシア\n"
    "- アフガニスタン\n"
    "- 空港\n"
    "\n"
    "### 入力:\n"
    "中東にある国は？\n"
    "\n"
    "### 応答:\n"
    "アフガニスタン\n"
    "\n"
    "### 指示:\n"
    "与えられた選択肢の中から、最適な答えを選んでください。出力は以下から選択してください：\n"
    "- 蛇口\n"
    "- ハンドル\n"
    "- 流し\n"
    "- 釘\n"
    "- 食器棚\n"
    "\n"
    "### 入力:\n"
    "水を出すときに捻るものは？\n"
    "\n"
    "### 応答:\n"
)
JSQUAD_02_FIRST = (
    "質問に対する回答を文章から一言で抽出してください。回答は名詞で答えてください。\n"
    "\n"
    "文章:夫妻の間には14人の子供が産まれている。しかし半数の7名は幼少時に様々な病気で死亡し第一子（長男）のイージドールも早世しており、グスタフはいわば長男として育てられた。そのなか心臓水腫に長期間苦しんだ弟エルンストは、少年期のグスタフにとって悲しい体験となった。グスタフは盲目のエルンストを愛し、彼が死去するまで数ヶ月間ベッドから離れずに世話をしたという。\n"
    "質問:夫妻の間に何人の子供が産まれたか？\n"
    "回答:14人\n"
    "\n"
    "文章:酒造業者の息子として育ったマーラーは、「シュパーテンブロイ」という銘柄の黒ビールが好物だった。しかし本人はあまり酒に強くなかった。\n"
    "質問:グスタフ・マーラーは何の息子として育った？\n"
    "回答:酒造業者\n"
    "\n"
    "文章:梅雨（つゆ、ばいう）は、北海道と小笠原諸島を除く日本、朝鮮半島南部、中国の南部から長江流域にかけての沿海部、および台湾など、東アジアの広範囲においてみられる特有の気象現象で、5月から7月にかけて来る曇りや雨の多い期間のこと。雨季の一種である。\n"
    "質問:梅雨がみられるのはどの期間？\n"
    "回答:"
)
JSQUAD_03_FIRST = (
    "以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n"
    "\n"
    "### 指示:\n"
    "与えられた文脈から、質問に対する答えを抜き出してください。\n"
    "\n"
    "### 入力:\n"
    "文脈：夫妻の間には14人の子供が産まれている。しかし半数の7名は幼少時に様々な病気で死亡し第一子（長男）のイージドールも早世しており、グスタフはいわば長男として育てられた。そのなか心臓水腫に長期間苦しんだ弟エルンストは、少年期のグスタフにとって悲しい体験となった。グスタフは盲目のエルンストを愛し、彼が死去するまで数ヶ月間ベッドから離れずに世話をしたという。\n"
    "質問：夫妻の間に何人の子供が産まれたか？\n"
    "\n"
    "### 応答:\n"
    "14人\n"
    "\n"
    "### 指示:\n"
    "与えられた文脈から、質問に対する答えを抜き出してください。\n"
    "\n"
    "### 入力:\n"
    "文脈：酒造業者の息子として育ったマーラーは、「シュパーテンブロイ」という銘柄の黒ビールが好物だった。しかし本人はあまり酒に強くなかった。\n"
    "質問：グスタフ・マーラーは何の息子として育った？\n"
    "\n"
    "### 応答:\n"
    "酒造業者\n"
    "\n"
    "### 指示:\n"
    "与えられた文脈から、質問に対する答えを抜き出してください。\n"
    "\n"
    "### 入力:\n"
    "文脈：梅雨（つゆ、ばいう）は、北海道と小笠原諸島を除く日本、朝鮮半島南部、中国の南部から長江流域にかけての沿海部、および台湾など、東アジアの広範囲においてみられる特有の気象現象で、5月から7月にかけて来る曇りや雨の多い期間のこと。雨季の一種である。\n"
    "質問：梅雨がみられるのはどの期間？\n"
    "\n"
    "### 応答:\n"
)

HARNESS_SHA256 = {
    ("jcommonsenseqa", "0.2"): [
        ("8942", "a62003bc2323b2cbfe5bc0336256f9a45ad254d8a38d965d81aabc3c5875a5c7"),
        ("8940", "8abad7346077cc5c761ec08162f101c9975566d38fa9e2e6cb055ed91cab4074"),
        ("8941", "fd0649fdbe440d5e27c2a404afae57a8dc1cc799ccee7fae488b75508bafdff4"),
        ("8943", "29a3c33db6f19926086b3e8074ac67c4d53c65d8ebcb72562f94ef407499bc8d"),
        ("8939", "b8b2da0b6604446328381cb527aec762730d48c551484d006441c71476094b9b"),
        ("8944", "765f7b5e5ed26679fe11cf39635a3b9ffd75dd2b0528791d03142379b5f47095"),
    ],
    ("jcommonsenseqa", "0.3"): [
        ("8942", "3f259fa7b924d5d8aaa4b8924a59492f7699b11e130b16cbf6c9302126146694"),
        ("8940", "05a6699c5d536d3c6c12862e9eb4d506d688b5a7915d24595d136824346fa878"),
        ("8941", "f1e33bec0ae77678e83d8e887cc1b9ffb4dee135b556b56b8a47c9c304221557"),
        ("8943", "c4074599fd5776f6ccf5081cb5626b356a9e8e24882b801ffaa023ead8806b86"),
        ("8939", "834adec812dba77bdabc20ae7193396e2e626591350df2ad891a33ed514babbd"),
        ("8944", "8ac3efc9d7cd2efafe85b42ef8f774f1e780294d6544278de97f4cf520045eeb"),
    ],
    ("jsquad", "0.2"): [
        ("a10336p0q3", "273ba1fedb8ff607b13edab1d1f7134950de1ea46df6de24599d5fd068cc0131"),
        ("a10336p0q1", "70b6f4099fe3302c1a2b443f165fe5c0ed3a8830ffe23ce55b9337b966094dd0"),
        ("a10336p0q2", "43875957ea6bf7be11b726debdd61ec90843b7286e6aac8c8034daf11098c568"),
        ("a10336p1q0", "ab7f050f27e9e22a8a422aa7d44ed4cf1093e0ff095c61fde538a98380eeac17"),
        ("a10336p0q0", "ed794ac66cc8cd427d3ee60e8bfcaf22c4fc1aa5fcf352a388172db9623cb62e"),
    ],
    ("jsquad", "0.3"): [
        ("a10336p0q3", "825be99b654b0ab024ee3a38faf9ac40006a812e494a0e8978ed6f3c62ceebfc"),
        ("a10336p0q1", "2445dcadbafdbd8bdd1bd20cdddf6e9a8b5388b630ff0f6a8a846e837cee755d"),
        ("a10336p0q2", "35826222160a123f01daa90716a6ce2d0a543b88f2d698c3431c07826e4dea1c"),
        ("a10336p1q0", "07016e6783a17ec104dbbff3b93614b6b8d4521b94f4ca5681cefa0fe4b325d9"),
        ("a10336p0q0", "ef8b756e7193a1b2852952e3d60990ec7778e81ff9029c3ac5806188942887c8"),
    ],
}
FIRST = {
    ("jcommonsenseqa", "0.2"): JCQA_02_FIRST,
    ("jcommonsenseqa", "0.3"): JCQA_03_FIRST,
    ("jsquad", "0.2"): JSQUAD_02_FIRST,
    ("jsquad", "0.3"): JSQUAD_03_FIRST,
}


def _files(task: str):
    if task == "jcommonsenseqa":
        return (
            load_jcommonsenseqa(DATA / "jcommonsenseqa-valid.json"),
            load_jcommonsenseqa(DATA / "jcommonsenseqa-train.json"),
            3,
        )
    return load_jsquad(DATA / "jsquad-valid.json"), load_jsquad(DATA / "jsquad-train.json"), 2


@pytest.mark.parametrize("task,version", sorted(HARNESS_SHA256))
def test_prompts_equal_the_harness_byte_for_byte(task, version):
    valid, train, k = _files(task)
    tpl = template(task, version)
    assert tpl.name == f"{task}-1.1-{version}"
    got = [(item.qid, tpl.prompt(item, shots)) for item, shots in plan(valid, train, k)]
    assert got[0][1] == FIRST[(task, version)]
    assert [(q, hashlib.sha256(p.encode()).hexdigest()) for q, p in got] == HARNESS_SHA256[(task, version)]


def test_jcqa_02_targets_are_numbers_and_03_targets_are_choices():
    valid, train, _ = _files("jcommonsenseqa")
    item = train[0]
    assert template("jcommonsenseqa", "0.2").target(item) == str(item.label)
    assert template("jcommonsenseqa", "0.3").target(item) == item.choices[item.label]


def test_sampling_is_reproducible_per_question_and_limit_keeps_the_shuffled_head():
    valid, train, k = _files("jcommonsenseqa")
    a = [(i.qid, [s.qid for s in shots]) for i, shots in plan(valid, train, k)]
    b = [(i.qid, [s.qid for s in shots]) for i, shots in plan(valid, train, k)]
    assert a == b
    assert [q for q, _ in a] != [i.qid for i in valid]  # shuffled, not file order
    assert len({tuple(s) for _, s in a}) > 1  # a fresh draw per question
    head = [(i.qid, [s.qid for s in shots]) for i, shots in plan(valid, train, k, limit=2)]
    assert head == a[:2]
    other = [(i.qid, [s.qid for s in shots]) for i, shots in plan(valid, train, k, seed=7)]
    assert other != a


@pytest.mark.parametrize("task", ["jcommonsenseqa", "jsquad"])
def test_without_a_train_split_examples_never_include_the_question(task):
    valid, _, k = _files(task)
    todo = plan(valid, None, k)
    assert len(todo) == len(valid)
    for item, shots in todo:
        assert len(shots) == k and item.qid not in {s.qid for s in shots}
        assert all(s in valid for s in shots)
    assert [(i.qid, [s.qid for s in sh]) for i, sh in todo] == [
        (i.qid, [s.qid for s in sh]) for i, sh in plan(valid, None, k)
    ]


def test_too_few_items_for_the_shots_is_refused():
    valid, _, _ = _files("jsquad")
    with pytest.raises(ValueError, match="needs 6 items"):
        plan(valid, None, 5)


def test_normalisation_is_the_harness_one():
    # neologdn: full-width alphanumerics to half-width, spaces between Japanese removed,
    # long-vowel runs folded; emoji removed; punctuation (a trailing 。) kept.
    assert normalize_answer("３７７６メートル ") == "3776メートル"
    assert normalize_answer("月曜日。") == "月曜日。"
    assert normalize_answer("東京 タワー") == "東京タワー"
    assert normalize_answer("すごーーーい😀") == "すごーい"
    assert normalize_answer("  Hello   World ") == "Hello World"


def test_exact_match_is_the_best_over_gold_answers():
    golds = ["小笠原諸島", "小笠原諸島を除く日本", "小笠原諸島"]
    assert exact_match("小笠原諸島", golds)
    assert exact_match("小笠原諸島を除く日本", golds)
    assert not exact_match("北海道", golds)
    # A gold answer ending in 。 matches only an answer that keeps it (the harness keeps punctuation).
    assert exact_match("雨季の一種である。", ["雨季の一種である。"])
    assert not exact_match("雨季の一種である", ["雨季の一種である。"])
    assert not exact_match("小笠原諸島。", ["小笠原諸島"])
    # Full-width digits and stray spaces normalise away.
    assert exact_match("１４人 ", ["14人"])


def test_generation_is_cut_at_the_first_newline_without_strip():
    assert first_line("14人\n\n文章:") == "14人"
    assert first_line(" 酒造業者") == " 酒造業者"
