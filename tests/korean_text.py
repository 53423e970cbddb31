"""Korean text of our own: sentences composed from word lists with a fixed seed.

The suite needs Korean text wherever the shared KorSTS data is absent (a user's clone): enough to train
the WordPiece and SentencePiece vocabularies of the tiny checkpoints, and several hundred distinct test
texts of mixed length. ``korean_sentences(n, seed)`` gives ``n`` distinct sentences, the same ones for
the same arguments on every machine and Python (only ``random.Random(seed)`` draws, no set order).

The sentences are grammatical enough to tokenize like real text (particles chosen by the final
consonant, verb endings that attach to any stem), and mix what the tests want to meet: short replies
and long compound sentences, news with dates, amounts with thousands separators and percentages,
questions, quotes and brackets, Latin acronyms, and personal names composed from syllables, so that
many word forms are rare or unseen in the training text and WordPiece splits them.
"""

from __future__ import annotations

import functools
import random

PEOPLE = [
    "남자", "여자", "소년", "소녀", "아이", "아기", "학생", "대학생", "선생님", "교수", "의사", "간호사", "요리사",
    "경찰관", "소방관", "기자", "가수", "배우", "화가", "농부", "어부", "운전기사", "회사원", "사장님", "할머니",
    "할아버지", "어머니", "아버지", "형", "누나", "동생", "친구", "손님", "관광객", "군인", "선수", "감독", "작가",
    "우체부", "점원", "노인", "청년", "개발자", "연구원", "변호사", "판사", "승무원", "미용사", "목수", "사진작가",
]
ANIMALS = [
    "개", "강아지", "고양이", "새", "말", "소", "돼지", "토끼", "원숭이", "코끼리", "호랑이", "사자", "곰", "오리",
    "닭", "물고기", "거북이", "다람쥐", "여우", "늑대", "펭귄", "돌고래", "앵무새", "고슴도치",
]
# (objects, verb stems that go with them); every ending in ENDINGS attaches to these stems unchanged.
THINGS = [
    (["사과", "바나나", "빵", "김밥", "라면", "떡볶이", "비빔밥", "불고기", "김치", "케이크", "아이스크림", "수박",
      "포도", "감자", "고구마", "당근", "양파", "토마토", "국수", "만두", "두부", "생선", "계란", "샌드위치"],
     ["먹", "자르", "씻", "사", "팔", "요리하", "굽", "나누", "준비하", "고르", "썰", "포장하"]),
    (["책", "신문", "잡지", "편지", "소설", "보고서", "계약서", "이메일", "시집", "만화책", "교과서", "논문",
      "일기", "설명서", "악보", "지도"],
     ["읽", "쓰", "보내", "받", "찾", "정리하", "번역하", "출력하", "고치", "검토하", "펼치", "덮"]),
    (["기타", "피아노", "바이올린", "드럼", "첼로", "플루트", "하모니카", "가야금", "색소폰"],
     ["치", "연주하", "배우", "조율하", "닦", "옮기", "고치", "들"]),
    (["자전거", "자동차", "버스", "오토바이", "트럭", "기차", "배", "택시", "지하철", "비행기", "킥보드"],
     ["타", "운전하", "고치", "세우", "기다리", "닦", "빌리", "몰", "점검하"]),
    (["모자", "코트", "치마", "바지", "셔츠", "운동화", "안경", "장갑", "목도리", "넥타이", "양말", "원피스"],
     ["사", "고르", "빨", "정리하", "벗", "입", "찾", "개", "다리", "수선하"]),
    (["공", "상자", "의자", "책상", "컴퓨터", "휴대폰", "카메라", "우산", "가방", "열쇠", "시계", "사진", "그림",
      "꽃", "나무", "돌", "종이", "연필", "창문", "문", "냉장고", "텔레비전", "노트북", "화분", "거울", "연"],
     ["던지", "잡", "옮기", "들", "고치", "닦", "그리", "찍", "열", "닫", "만들", "심", "칠하", "날리", "살펴보"]),
]
INTRANSITIVE = ["걷", "뛰", "달리", "놀", "자", "쉬", "울", "웃", "춤추", "수영하", "노래하", "일하", "공부하",
                "기다리", "산책하", "운동하", "이야기하", "싸우", "졸", "떠들", "구경하", "줄을 서"]
ENDINGS = [
    "고 있다", "고 있었다", "고 있습니다", "고 있어요", "기 시작했다", "기로 했다", "지 않았다", "지 않는다",
    "게 되었다", "고 싶어 한다", "지 못했다", "곤 했다", "기를 좋아한다", "고 싶지 않았다", "기 어려웠다",
    "고 있는 것 같다", "기로 약속했다", "지 않을 것이다", "고 있었습니까", "게 될 거예요",
]
LINKS = ["고", "지만", "다가", "자마자", "기 전에", "고 나서"]
ADVERBS = ["천천히", "빠르게", "조용히", "열심히", "즐겁게", "함께", "혼자", "다시", "갑자기", "조심스럽게",
           "오랫동안", "잠깐", "매일", "자주", "가끔", "아직", "벌써", "몰래", "정성껏", "대충", "묵묵히", "신나게"]
TIMES = ["오늘", "어제", "내일", "아침에", "저녁에", "밤늦게", "주말에", "지난주에", "점심시간에", "새벽에",
         "월요일 아침에", "퇴근 후에", "방학 동안", "설날에", "추석 연휴에", "비가 오는 날에"]
PLACES = ["공원", "학교", "도서관", "시장", "병원", "식당", "부엌", "거실", "거리", "해변", "산", "강가", "바닷가",
          "운동장", "무대", "사무실", "회사", "카페", "공항", "기차역", "마당", "교실", "백화점", "편의점", "놀이터",
          "수영장", "호텔", "박물관", "미술관", "주차장", "정류장", "옥상", "골목", "체육관", "연구실", "농장"]
CITIES = ["서울", "부산", "대구", "인천", "광주", "대전", "울산", "제주도", "강릉", "전주", "경주", "춘천", "포항",
          "여수", "수원", "청주", "목포", "안동", "속초", "세종"]
MODIFIERS = ["작은", "큰", "빨간", "파란", "노란", "하얀", "검은", "오래된", "새", "낡은", "예쁜", "귀여운", "무거운",
             "가벼운", "따뜻한", "차가운", "비싼", "싼", "유명한", "조용한", "넓은", "좁은", "이상한", "반짝이는"]
ORGS = ["정부", "국회", "서울시", "한국은행", "교육부", "보건복지부", "기상청", "경찰청", "법원", "연구팀",
        "시민단체", "한 대기업", "중소기업들", "노동조합", "소비자단체", "국토교통부", "환경부", "대학 병원"]
TOPICS = ["새로운 교통 정책", "부동산 대책", "금리 인상", "최저임금", "미세먼지 대책", "청년 일자리", "출산율",
          "수출 실적", "태풍 피해", "의료 개혁", "인공지능 규제", "전기차 보조금", "물가 상승", "공공요금 인상",
          "대중교통 요금", "학교 급식", "재난 지원금", "탄소 중립 계획", "반도체 투자", "지방 소멸 문제"]
NEWS_VERBS = ["발표했다", "검토하고 있다", "논의했다", "승인했다", "반대했다", "비판했다", "발표할 예정이다",
              "공개했다", "재검토하기로 했다", "강하게 요구했다", "조사하고 있다고 밝혔다"]
WEATHER = ["맑고 바람이 조금 분다", "흐리고 오후부터 비가 온다", "눈이 많이 내린다", "안개가 짙게 낀다",
           "덥고 습하다", "쌀쌀하고 건조하다", "소나기가 내릴 가능성이 있다", "황사 때문에 공기가 탁하다"]
LATIN = ["AI", "USB", "KTX", "SNS", "CEO", "OTT", "Wi-Fi", "GPS", "PC", "IT", "K-pop", "QR 코드", "CCTV", "ATM",
         "e스포츠", "BTS", "LED", "GDP"]
SURNAMES = ["김", "이", "박", "최", "정", "강", "조", "윤", "장", "임", "한", "오", "서", "신", "권", "황", "안", "송"]
NAME_SYLLABLES = ["민", "서", "준", "지", "현", "우", "예", "은", "도", "하", "윤", "수", "진", "영", "호", "연", "주",
                  "성", "희", "경", "태", "아", "린", "혁", "빈", "솔", "찬", "율", "채", "원"]
SHORT = ["네, 알겠습니다.", "정말요?", "괜찮아요.", "감사합니다!", "잠시만 기다려 주세요.", "어서 오세요.",
         "다음에 또 봐요.", "아니요, 괜찮습니다.", "맛있겠다!", "벌써 끝났어?", "조심히 들어가세요.", "와, 대박!",
         "어떡하지…", "그래서요?", "좋은 아침입니다.", "수고하셨습니다."]


def has_final(word: str) -> bool:
    """Whether the last syllable of ``word`` has a final consonant (batchim); digits as read in Korean."""
    last = word.rstrip()[-1]
    if "가" <= last <= "힣":
        return (ord(last) - 0xAC00) % 28 != 0
    if last.isdigit():
        return last in "013678"  # 영 일 삼 육 칠 팔 end in a consonant
    return False  # Latin letters: most acronyms are read ending in a vowel (케이티엑스 aside)


def particle(word: str, with_final: str, without: str) -> str:
    """``word`` + the particle form its last sound takes (이/가, 은/는, 을/를, 과/와, 으로/로)."""
    if with_final == "으로":  # ㄹ-final words take 로 too
        last = word[-1]
        final = (ord(last) - 0xAC00) % 28 if "가" <= last <= "힣" else 0
        return word + ("으로" if has_final(word) and final != 8 else "로")
    return word + (with_final if has_final(word) else without)


class _Composer:
    def __init__(self, rng: random.Random):
        self.r = rng

    def pick(self, items):
        return self.r.choice(items)

    def maybe(self, p: float, text: str) -> str:
        return text if self.r.random() < p else ""

    def name(self) -> str:
        return self.pick(SURNAMES) + "".join(self.pick(NAME_SYLLABLES) for _ in range(self.r.choice((1, 2, 2, 2))))

    def agent(self) -> str:
        r = self.r.random()
        if r < 0.15:
            return self.name() + self.pick(["", " 씨", " 선생님", " 선수", " 기자"])
        if r < 0.3:
            return f"{self.r.randint(2, 12)}{self.pick(['명의', '마리의'])} {self.pick(PEOPLE + ANIMALS)}"
        head = self.pick(PEOPLE if r < 0.8 else ANIMALS)
        return " ".join(w for w in (self.maybe(0.4, self.pick(MODIFIERS)), head) if w)

    def place(self) -> str:
        r = self.r.random()
        if r < 0.25:
            return f"{self.pick(CITIES)}의 {self.pick(PLACES)}"
        if r < 0.35:
            return f"{self.r.randint(1, 30)}층 {self.pick(PLACES)}"
        return " ".join(w for w in (self.maybe(0.3, self.pick(MODIFIERS)), self.pick(PLACES)) if w)

    def predicate(self, ending: str) -> str:
        """[object + particle] [adverb] stem + ending."""
        if self.r.random() < 0.3:
            return " ".join(w for w in (self.maybe(0.5, self.pick(ADVERBS)), self.pick(INTRANSITIVE) + ending) if w)
        objects, verbs = self.pick(THINGS)
        obj = self.pick(objects)
        if self.r.random() < 0.35:
            obj = f"{self.pick(MODIFIERS)} {obj}"
        elif self.r.random() < 0.1:
            obj = f"{self.pick(LATIN)} {obj}"
        parts = [particle(obj, "을", "를"), self.maybe(0.5, self.pick(ADVERBS)), self.pick(verbs) + ending]
        return " ".join(w for w in parts if w)

    def scene(self) -> str:
        subject = self.agent()
        topic = particle(subject, "은", "는") if self.r.random() < 0.3 else particle(subject, "이", "가")
        parts = [self.maybe(0.4, self.pick(TIMES)), topic, self.maybe(0.6, self.place() + "에서")]
        clauses = self.r.choice((1, 1, 1, 2, 2, 3))
        for _ in range(clauses - 1):
            parts.append(self.predicate(self.pick(LINKS)) + self.maybe(0.3, ","))
        parts.append(self.predicate(self.pick(ENDINGS)))
        sentence = " ".join(w for w in parts if w)
        return sentence + ("?" if sentence.endswith("니까") else self.pick([".", ".", ".", "!", "..."]))

    def date(self) -> str:
        return f"{self.r.randint(1990, 2030)}년 {self.r.randint(1, 12)}월 {self.r.randint(1, 28)}일"

    def news(self) -> str:
        org = particle(self.pick(ORGS), "은", "는")
        r = self.r.random()
        if r < 0.4:
            return f"{org} {self.date()} {particle(self.pick(TOPICS), '을', '를')} {self.pick(NEWS_VERBS)}."
        if r < 0.7:
            change = f"{self.r.randint(0, 30)}.{self.r.randint(0, 9)}%"
            return (f"{self.pick(TOPICS)}에 따라 {self.pick(['올해', '지난달', '3분기', '상반기'])} "
                    f"{self.pick(['매출이', '수출이', '물가가', '이용객이', '사고가'])} {change} "
                    f"{self.pick(['증가했다', '감소했다', '늘었다', '줄었다'])}고 {org} 밝혔다.")
        quote = self.pick(["문제를 해결하겠다", "시민의 안전이 가장 중요하다", "아직 결정된 것은 없다",
                           "예산을 늘릴 계획이다", "협의를 계속하겠다"])
        return f"{self.name()} {self.pick(['대변인', '위원장', '교수', '장관'])}은 “{quote}”고 말했다."

    def money(self) -> str:
        item = self.pick([o for objs, _ in THINGS for o in objs])
        amount = self.r.choice((self.r.randrange(1_000, 100_000, 100), self.r.randrange(100_000, 10**8, 1000)))
        r = self.r.random()
        if r < 0.5:
            return f"{item} 가격은 {amount:,}원이며, 할인가는 {amount * self.r.randint(5, 9) // 10:,}원이다."
        if r < 0.75:
            return f"{self.r.randint(1, 99)}개에 {amount:,}원이라니, 너무 비싸요!"
        way = particle(self.pick(["카드", "현금", "계좌 이체", "상품권"]), "으로", "로")
        return f"총 {amount:,}원 (부가세 {amount // 10:,}원 포함)을 {way} 결제했습니다."

    def weather(self) -> str:
        when = self.pick(["오늘", "내일", "이번 주말", "모레"])
        return (f"{when} {self.pick(CITIES)}의 날씨는 {self.pick(WEATHER)}. "
                f"기온은 {self.pick(['영하 ', ''])}{self.r.randint(0, 35)}도까지 {self.pick(['오른다', '내려간다'])}.")

    def question(self) -> str:
        by = particle(self.pick(["버스", "지하철", "기차", "택시"]), "으로", "로")
        item = particle(self.pick([o for objs, _ in THINGS for o in objs]), "은", "는")
        return self.pick([
            f"{self.place()}까지 {by} 얼마나 걸려요?",
            f"{item} 어디에서 살 수 있어요?",
            f"{self.pick(TIMES)} {self.place()}에서 만날까요?",
            f"혹시 {self.name()} 씨 전화번호 아세요? 010-{self.r.randint(1000, 9999)}-{self.r.randint(1000, 9999)}요?",
            f"{self.pick(LATIN)} 설정은 어떻게 바꾸나요?",
        ])

    def address(self) -> str:
        return (f"{self.pick(CITIES)} {self.pick(['중구', '남구', '북구', '서구', '동구', '수성구', '해운대구'])} "
                f"{self.pick(['세종대로', '중앙로', '한강대로', '가로수길', '문화로'])} {self.r.randint(1, 999)}"
                f"{self.maybe(0.4, f', {self.r.randint(101, 1505)}호')}")

    def sentence(self) -> str:
        r = self.r.random()
        for limit, kind in ((0.55, self.scene), (0.67, self.news), (0.75, self.money), (0.81, self.weather),
                            (0.88, self.question), (0.92, self.address)):
            if r < limit:
                return kind()
        return self.pick(SHORT)


def korean_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct Korean sentences, the same for the same ``n`` and ``seed``; the first ``k`` of
    ``korean_sentences(n, seed)`` are ``korean_sentences(k, seed)``."""
    return list(_sentences(n, seed))


@functools.lru_cache(maxsize=16)
def _sentences(n: int, seed: int) -> tuple[str, ...]:
    composer = _Composer(random.Random(seed))
    out: dict[str, None] = {}  # insertion-ordered, unlike a set
    while len(out) < n:
        out.setdefault(composer.sentence())
    return tuple(out)
